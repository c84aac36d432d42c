//! The chaos drill's schedule, pure: from a seed and a setting, every act of the drill
//! and its time from the start. The same seed gives the same schedule (a failing seed
//! replays); what an act picks among the things that exist when it runs (which peer,
//! which session) comes from its own `pick`, so a replay picks alike when the world is
//! alike. No clock, no randomness other than the seed.

#![allow(dead_code)]

use std::fmt;
use std::time::Duration;

/// How many gateways the drill runs (two per location, two locations).
pub const GATEWAYS: usize = 4;
/// Locations: 0 without MFA, 1 with MFA.
pub const LOCATIONS: usize = 2;

/// What crashes: the Core or one gateway's agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Core,
    Agent(usize),
}

/// A change made through the Core's admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admin {
    /// A new churn peer (on the MFA location it waits for a session).
    AddPeer {
        location: usize,
    },
    /// A churn peer's allowed IPs replaced by a fresh address.
    ChangeAllowedIps {
        location: usize,
        pick: u64,
    },
    /// A churn peer's public key replaced (a re-created peer).
    Rekey {
        location: usize,
        pick: u64,
    },
    RemovePeer {
        location: usize,
        pick: u64,
    },
    /// An MFA session started for a churn peer of the MFA location (none of them has a
    /// client: the session expires for inactivity unless ended first).
    StartSession {
        pick: u64,
    },
    EndSession {
        pick: u64,
    },
    /// A new firewall policy drawn from `pick` (always letting the clients' pings pass).
    Firewall {
        location: usize,
        pick: u64,
    },
}

/// A change made by hand on a gateway, behind the agent's back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drift {
    /// `wg set peer <churn peer> remove`.
    RemovePeer { pick: u64 },
    /// `wg set peer <churn peer> allowed-ips <other>`.
    ChangeAllowedIps { pick: u64 },
    /// `wg set peer <unknown key> allowed-ips ...`.
    AddRogue { pick: u64 },
    /// `nft delete table` of the agent's table.
    DeleteTable,
    /// `nft flush chain ... vpn`: the policy chain emptied.
    FlushPolicy,
    /// `nft add rule ... vpn ...`: a rule the policy does not have.
    AddRule { pick: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// SIGKILL.
    Kill(Target),
    /// Started again after a [`Act::Kill`].
    Restart(Target),
    /// nftables drops between this gateway and the Core, both ways.
    CutStart(usize),
    CutEnd(usize),
    Admin(Admin),
    Drift(usize, Drift),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub at: Duration,
    pub act: Act,
}

/// How big a drill is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Setting {
    /// SIGKILLs of the Core and the agents, in total.
    pub crashes: usize,
    /// The schedule's length: crashes are spread evenly over it (with jitter).
    pub length: Duration,
    /// Admin changes per second (on average).
    pub admin_per_sec: f64,
}

impl Setting {
    /// `crashes` crashes, one every 4 s on average, two admin changes a second.
    pub fn with_crashes(crashes: usize) -> Setting {
        Setting {
            crashes,
            length: Duration::from_secs((crashes as u64 * 4).max(40)),
            admin_per_sec: 2.0,
        }
    }
}

/// The longest a crashed Core or agent stays down.
pub const MAX_DOWN: Duration = Duration::from_millis(4000);
/// The longest cut between a gateway and the Core.
pub const MAX_CUT: Duration = Duration::from_secs(12);

/// The schedule of a drill, in time order (ties keep the order they were made in).
pub fn plan(seed: u64, setting: Setting) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let mut steps = vec![];
    let len = setting.length.as_secs_f64();
    let ms = |s: f64| Duration::from_millis((s * 1000.0).round() as u64);

    // Crashes: slot k is centred at len * (k + 0.5) / crashes, jittered by a quarter of
    // a slot; a target still down at that time is not picked again.
    let mut down_until = [0.0f64; 1 + GATEWAYS];
    let slot = len / setting.crashes.max(1) as f64;
    for k in 0..setting.crashes {
        let at = slot * (k as f64 + 0.5) + (rng.unit() - 0.5) * slot * 0.5;
        let free: Vec<usize> = (0..down_until.len())
            .filter(|&t| down_until[t] < at)
            .collect();
        let t = if free.is_empty() {
            // Every target down (impossible with slots longer than MAX_DOWN / 4): the one
            // back first, right after it is back.
            (0..down_until.len())
                .min_by(|&a, &b| down_until[a].total_cmp(&down_until[b]))
                .unwrap_or(0)
        } else {
            free[rng.below(free.len() as u64) as usize]
        };
        let at = at.max(down_until[t] + 0.1);
        let down = 0.2 + rng.unit() * (MAX_DOWN.as_secs_f64() - 0.2);
        down_until[t] = at + down;
        let target = if t == 0 {
            Target::Core
        } else {
            Target::Agent(t - 1)
        };
        steps.push(Step {
            at: ms(at),
            act: Act::Kill(target),
        });
        steps.push(Step {
            at: ms(at + down),
            act: Act::Restart(target),
        });
    }

    // Cuts: one per four crashes and at least two, none overlapping another on the
    // same gateway.
    let mut cut_until = [0.0f64; GATEWAYS];
    for _ in 0..(setting.crashes / 4).max(2) {
        let gw = rng.below(GATEWAYS as u64) as usize;
        let at = (rng.unit() * (len - 2.0)).max(cut_until[gw] + 1.0);
        let cut = 1.0 + rng.unit() * (MAX_CUT.as_secs_f64() - 1.0);
        cut_until[gw] = at + cut;
        steps.push(Step {
            at: ms(at),
            act: Act::CutStart(gw),
        });
        steps.push(Step {
            at: ms(at + cut),
            act: Act::CutEnd(gw),
        });
    }

    // Admin changes: evenly spread with jitter.
    let count = (len * setting.admin_per_sec).round() as usize;
    for i in 0..count {
        let at = (i as f64 + rng.unit()) / setting.admin_per_sec;
        let location = rng.below(LOCATIONS as u64) as usize;
        let pick = rng.next();
        let admin = match rng.below(100) {
            0..=24 => Admin::AddPeer { location },
            25..=39 => Admin::ChangeAllowedIps { location, pick },
            40..=47 => Admin::Rekey { location, pick },
            48..=59 => Admin::RemovePeer { location, pick },
            60..=79 => Admin::StartSession { pick },
            80..=89 => Admin::EndSession { pick },
            _ => Admin::Firewall { location, pick },
        };
        steps.push(Step {
            at: ms(at),
            act: Act::Admin(admin),
        });
    }

    // Drift by hand: one every 5 s on average, on any gateway.
    let drifts = (len / 5.0).round() as usize;
    for _ in 0..drifts {
        let at = rng.unit() * len;
        let gw = rng.below(GATEWAYS as u64) as usize;
        let pick = rng.next();
        let drift = match rng.below(6) {
            0 => Drift::RemovePeer { pick },
            1 => Drift::ChangeAllowedIps { pick },
            2 => Drift::AddRogue { pick },
            3 => Drift::DeleteTable,
            4 => Drift::FlushPolicy,
            _ => Drift::AddRule { pick },
        };
        steps.push(Step {
            at: ms(at),
            act: Act::Drift(gw, drift),
        });
    }

    steps.sort_by_key(|s| s.at);
    steps
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Core => write!(f, "core"),
            Target::Agent(i) => write!(f, "agent {}", gateway_label(*i)),
        }
    }
}

/// A gateway's label: `l<location>-<a|b>` (gateways 0, 1 serve location 0; 2, 3 location 1).
pub fn gateway_label(gw: usize) -> String {
    format!("l{}{}", location_of(gw), ["a", "b"][gw % 2])
}

/// The location a gateway serves.
pub fn location_of(gw: usize) -> usize {
    gw / 2
}

/// SplitMix64: small, fast and good enough to draw a schedule from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n) (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

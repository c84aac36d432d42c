//! Traffic timelines of the HA drill, pure: the answers of `ping -D` parsed from its log
//! (or the echoes of the TCP flow), the interruption of one move measured from them, the
//! longest gap in a quiet period (the black-hole check), and median and worst of a
//! series. No clock is read here: every time is an argument (unix seconds).

#![allow(dead_code)]

/// One answered probe: when the answer arrived (unix seconds) and its sequence number.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Answer {
    pub at: f64,
    pub seq: u64,
}

/// The answers in the output of `ping -D -n`: lines such as
/// `[1764612345.123456] 64 bytes from 10.77.0.1: icmp_seq=12 ttl=64 time=0.51 ms`.
/// Other lines (the header, "no answer yet", the summary) are skipped; so is a line cut
/// short by a log read while ping writes it.
pub fn parse_ping_log(text: &str) -> Vec<Answer> {
    text.lines().filter_map(parse_answer).collect()
}

fn parse_answer(line: &str) -> Option<Answer> {
    let rest = line.strip_prefix('[')?;
    let (stamp, rest) = rest.split_once(']')?;
    if !rest.contains(" bytes from ") || !rest.contains(" time=") {
        return None;
    }
    let at: f64 = stamp.parse().ok()?;
    let seq = rest
        .split_whitespace()
        .find_map(|w| w.strip_prefix("icmp_seq="))?
        .parse()
        .ok()?;
    Some(Answer { at, seq })
}

/// How traffic fared across one move (a gateway cut off, returning, drained...).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outage {
    /// The longest time between two consecutive answers from the last answer before the
    /// move started until traffic had resumed: what a user sees as the interruption
    /// (one probe interval when nothing was lost).
    pub gap: f64,
    /// When the first answer of the resumed run arrived.
    pub resumed_at: f64,
}

/// The outage of a move that started at `start` and whose new gateway held the address
/// from `moved` on (`moved >= start`): traffic has resumed once `run` answers with
/// consecutive sequence numbers have arrived after `moved`. None while it has not.
/// Answers must be in arrival order (as ping writes them).
pub fn outage(answers: &[Answer], start: f64, moved: f64, run: usize) -> Option<Outage> {
    let run = run.max(1);
    // The run of consecutive answers after `moved` that ends the outage.
    let mut first = None;
    let mut len = 0;
    let mut end = None;
    for (i, a) in answers.iter().enumerate() {
        if a.at < moved {
            continue;
        }
        let follows = i > 0 && len > 0 && answers[i - 1].seq + 1 == a.seq;
        if follows {
            len += 1;
        } else {
            first = Some(i);
            len = 1;
        }
        if len >= run {
            end = Some(i);
            break;
        }
    }
    let (first, end) = (first?, end?);
    let before = answers[..=end].iter().rposition(|a| a.at < start);
    // With no answer before the start, the outage is measured from the start itself.
    let mut prev = before.map_or(start, |i| answers[i].at);
    let mut gap: f64 = 0.0;
    for a in &answers[before.map_or(0, |i| i + 1)..=end] {
        if a.at < start {
            continue;
        }
        gap = gap.max(a.at - prev);
        prev = a.at;
    }
    Some(Outage {
        gap,
        resumed_at: answers[first].at,
    })
}

/// The longest time without an answer within `[from, to]`, its ends included (no answer
/// at all: the whole period).
pub fn longest_gap(answers: &[Answer], from: f64, to: f64) -> f64 {
    let mut prev = from;
    let mut gap: f64 = 0.0;
    for a in answers.iter().filter(|a| a.at >= from && a.at <= to) {
        gap = gap.max(a.at - prev);
        prev = a.at;
    }
    gap.max(to - prev)
}

/// Median and worst (largest) of a non-empty series; None when empty.
pub fn median_worst(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((median, v[n - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(at: f64, seq: u64) -> Answer {
        Answer { at, seq }
    }

    /// Answers every 0.1 s from `from` (seq `seq0`) to `to` exclusive.
    fn steady(from: f64, to: f64, seq0: u64) -> Vec<Answer> {
        let n = ((to - from) * 10.0).round() as u64;
        (0..n)
            .map(|i| a(from + i as f64 / 10.0, seq0 + i))
            .collect()
    }

    #[test]
    fn ping_log_lines_parse_and_the_rest_is_skipped() {
        let log = "PING 10.77.0.1 (10.77.0.1) 56(84) bytes of data.\n\
            [1764612345.123456] 64 bytes from 10.77.0.1: icmp_seq=1 ttl=64 time=0.512 ms\n\
            [1764612345.223456] no answer yet for icmp_seq=2\n\
            [1764612345.323456] 64 bytes from 10.77.0.1: icmp_seq=3 ttl=64 time=0.4 ms\n\
            [1764612345.4] 64 bytes from 10.77.0.1: icmp_seq=4 ttl=6\n\
            --- 10.77.0.1 ping statistics ---\n\
            4 packets transmitted, 2 received, 50% packet loss, time 300ms\n";
        let answers = parse_ping_log(log);
        assert_eq!(answers.len(), 2);
        assert_eq!(answers[0].seq, 1);
        assert!((answers[0].at - 1764612345.123456).abs() < 1e-6);
        assert_eq!(answers[1].seq, 3);
    }

    #[test]
    fn an_outage_is_the_longest_silence_until_traffic_resumes() {
        // Answers until 10.0, silence, answers again from 13.5 (the address moved at 12.0).
        let mut answers = steady(5.0, 10.05, 0);
        let last = answers.last().copied().unwrap();
        answers.extend(steady(13.5, 16.0, last.seq + 36));
        let o = outage(&answers, 10.2, 12.0, 10).unwrap();
        assert!((o.gap - 3.5).abs() < 1e-9, "{o:?}");
        assert!((o.resumed_at - 13.5).abs() < 1e-9);
        // Not resumed yet: fewer than `run` answers after the move.
        assert!(outage(&answers[..answers.len() - 20], 10.2, 12.0, 10).is_none());
    }

    #[test]
    fn a_move_without_loss_is_one_probe_interval() {
        let answers = steady(0.0, 10.0, 0);
        let o = outage(&answers, 3.0, 4.0, 10).unwrap();
        assert!((o.gap - 0.1).abs() < 1e-9, "{o:?}");
    }

    #[test]
    fn answers_before_the_move_do_not_end_the_outage() {
        // Traffic flows through the old gateway for a while after the start (a drain),
        // then stops when the address moves at 3.0, and resumes at 4.0.
        let mut answers = steady(0.0, 3.0, 0);
        answers.extend(steady(4.0, 6.0, 40));
        let o = outage(&answers, 1.0, 3.0, 5).unwrap();
        assert!((o.gap - 1.1).abs() < 1e-9, "{o:?}");
        assert!((o.resumed_at - 4.0).abs() < 1e-9);
    }

    #[test]
    fn a_lost_answer_inside_the_resumed_run_restarts_it() {
        // After the move: 2 answers, a loss, then a steady run.
        let mut answers = vec![a(0.0, 0), a(5.0, 50), a(5.1, 51)];
        answers.extend(steady(5.3, 7.0, 53));
        let o = outage(&answers, 1.0, 2.0, 5).unwrap();
        assert!((o.resumed_at - 5.3).abs() < 1e-9, "{o:?}");
        assert!((o.gap - 5.0).abs() < 1e-9);
    }

    #[test]
    fn no_answer_before_the_start_measures_from_the_start() {
        let answers = steady(2.0, 4.0, 20);
        let o = outage(&answers, 1.0, 1.5, 3).unwrap();
        assert!((o.gap - 1.0).abs() < 1e-9, "{o:?}");
    }

    #[test]
    fn longest_gap_counts_the_ends_of_the_period() {
        let answers = vec![a(1.0, 0), a(1.1, 1), a(3.0, 2), a(3.1, 3)];
        assert!((longest_gap(&answers, 0.0, 3.2) - 1.9).abs() < 1e-9);
        assert!((longest_gap(&answers, 0.0, 8.0) - 4.9).abs() < 1e-9);
        assert!((longest_gap(&[], 2.0, 5.0) - 3.0).abs() < 1e-9);
        let flowing = steady(0.0, 10.0, 0);
        assert!(longest_gap(&flowing, 1.0, 9.0) < 0.11);
    }

    #[test]
    fn median_and_worst() {
        assert_eq!(median_worst(&[]), None);
        assert_eq!(median_worst(&[3.0]), Some((3.0, 3.0)));
        assert_eq!(median_worst(&[5.0, 1.0, 3.0]), Some((3.0, 5.0)));
        assert_eq!(median_worst(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 4.0)));
    }
}

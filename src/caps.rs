//! Making a permitted CAP_NET_ADMIN usable, for the container image.
//!
//! Rule: the image gives the binary CAP_NET_ADMIN as a *permitted-only* file capability
//! (`setcap cap_net_admin+p`). A file with the effective bit cannot even be executed when
//! the container lacks NET_ADMIN (`docker run gatehouse --version` would fail), while a
//! permitted-only one always can. At start the agent raises what it is permitted into its
//! effective set, and into its inheritable and ambient sets so that the wireguard-go it
//! starts (and hooks) keep it. Without the capability in the permitted set (no NET_ADMIN
//! in the container, or a plain user) nothing changes; under systemd the unit's
//! `AmbientCapabilities=` has already done all of this, and raising again is a no-op.

use std::io;

/// CAP_NET_ADMIN (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
/// _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What [`raise_net_admin`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Raised {
    /// CAP_NET_ADMIN is effective and ambient now.
    Yes,
    /// It is not in the permitted set: the process runs without it.
    NotPermitted,
}

/// Raises a permitted CAP_NET_ADMIN into the effective, inheritable and ambient sets.
pub fn raise_net_admin() -> io::Result<Raised> {
    let bit = 1u32 << CAP_NET_ADMIN; // word 0 holds capabilities 0..=31
    let mut header = Header {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two `Data` words for version 3; both pointers are valid.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if data[0].permitted & bit == 0 {
        return Ok(Raised::NotPermitted);
    }
    if data[0].effective & bit == 0 || data[0].inheritable & bit == 0 {
        data[0].effective |= bit;
        data[0].inheritable |= bit;
        // SAFETY: as above; capset only reads the two words.
        if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE,
            CAP_NET_ADMIN as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Raised::Yes)
}

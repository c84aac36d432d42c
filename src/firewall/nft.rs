//! The nftables executor (libnftnl through `nftnl-sys`, netlink through `mnl`): writes a
//! rendered [`Ruleset`] as ONE batch that deletes and recreates the agent's table (the
//! kernel commits it as one transaction: no moment without rules), removes the table, and
//! reads the table back as an [`Image`] to compare with the desired one. Nothing outside
//! the agent's own table is ever named in a message.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::raw::{c_char, c_void};
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;
use nftnl::nftnl_sys::libc;

use super::render::{
    BaseChain, ChainType, CmpOp, Element, Expr, Hook, KeyType, Meta, PayloadBase, Ruleset,
};

/// Errors of the executor.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nftables netlink socket: {0}")]
    Socket(io::Error),
    #[error("nftables rejected the batch: {0}")]
    Rejected(io::Error),
    #[error("nftables read-back: {0}")]
    Read(String),
    #[error("name {0:?} contains a NUL byte")]
    BadName(String),
}

/// What one write sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Netlink messages in the batch (begin and end included).
    pub messages: usize,
    pub bytes: usize,
}

const FAMILY: u16 = libc::NFPROTO_INET as u16;
const NFT_SET_INTERVAL: u32 = libc::NFT_SET_INTERVAL as u32;

// ------------------------------------------------------------------ objects --

/// A libnftnl object type and its destructor.
trait Free {
    /// # Safety
    /// `p` was allocated by libnftnl and is freed once.
    unsafe fn free(p: *mut Self);
}

macro_rules! free {
    ($t:ty, $f:path) => {
        impl Free for $t {
            unsafe fn free(p: *mut Self) {
                unsafe { $f(p) }
            }
        }
    };
}
free!(sys::nftnl_table, sys::nftnl_table_free);
free!(sys::nftnl_chain, sys::nftnl_chain_free);
free!(sys::nftnl_set, sys::nftnl_set_free);
free!(sys::nftnl_rule, sys::nftnl_rule_free);
free!(sys::nftnl_set_elems_iter, sys::nftnl_set_elems_iter_destroy);

/// Owns a libnftnl object and frees it.
struct Owned<T: Free> {
    ptr: NonNull<T>,
}

impl<T: Free> Owned<T> {
    fn new(ptr: *mut T) -> Self {
        // libnftnl allocations only fail on OOM.
        let Some(ptr) = NonNull::new(ptr) else {
            std::process::abort()
        };
        Owned { ptr }
    }

    fn p(&self) -> *mut T {
        self.ptr.as_ptr()
    }
}

impl<T: Free> Drop for Owned<T> {
    fn drop(&mut self) {
        unsafe { T::free(self.ptr.as_ptr()) }
    }
}

fn cstr(s: &str) -> Result<CString, NftError> {
    CString::new(s).map_err(|_| NftError::BadName(s.to_string()))
}

fn table_obj(name: &CStr) -> Owned<sys::nftnl_table> {
    let t = Owned::new(unsafe { sys::nftnl_table_alloc() });
    unsafe {
        sys::nftnl_table_set_str(t.p(), sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
        sys::nftnl_table_set_u32(t.p(), sys::NFTNL_TABLE_FAMILY as u16, FAMILY as u32);
    }
    t
}

fn hooknum(h: Hook) -> u32 {
    (match h {
        Hook::Input => libc::NF_INET_LOCAL_IN,
        Hook::Forward => libc::NF_INET_FORWARD,
        Hook::Postrouting => libc::NF_INET_POST_ROUTING,
    }) as u32
}

fn chain_type(k: ChainType) -> &'static CStr {
    match k {
        ChainType::Filter => c"filter",
        ChainType::Nat => c"nat",
    }
}

fn chain_obj(table: &CStr, name: &CStr, base: Option<&BaseChain>) -> Owned<sys::nftnl_chain> {
    let c = Owned::new(unsafe { sys::nftnl_chain_alloc() });
    unsafe {
        sys::nftnl_chain_set_str(c.p(), sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
        sys::nftnl_chain_set_str(c.p(), sys::NFTNL_CHAIN_NAME as u16, name.as_ptr());
        sys::nftnl_chain_set_u32(c.p(), sys::NFTNL_CHAIN_FAMILY as u16, FAMILY as u32);
        if let Some(b) = base {
            sys::nftnl_chain_set_u32(c.p(), sys::NFTNL_CHAIN_HOOKNUM as u16, hooknum(b.hook));
            sys::nftnl_chain_set_s32(c.p(), sys::NFTNL_CHAIN_PRIO as u16, b.priority);
            sys::nftnl_chain_set_str(
                c.p(),
                sys::NFTNL_CHAIN_TYPE as u16,
                chain_type(b.kind).as_ptr(),
            );
            sys::nftnl_chain_set_u32(
                c.p(),
                sys::NFTNL_CHAIN_POLICY as u16,
                libc::NF_ACCEPT as u32,
            );
        }
    }
    c
}

fn set_obj(
    table: &CStr,
    name: &CStr,
    id: u32,
    key: KeyType,
    elements: &[Element],
) -> Owned<sys::nftnl_set> {
    let s = Owned::new(unsafe { sys::nftnl_set_alloc() });
    let (key_type, key_len) = key.nft();
    unsafe {
        sys::nftnl_set_set_str(s.p(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
        sys::nftnl_set_set_str(s.p(), sys::NFTNL_SET_NAME as u16, name.as_ptr());
        sys::nftnl_set_set_u32(s.p(), sys::NFTNL_SET_FAMILY as u16, FAMILY as u32);
        sys::nftnl_set_set_u32(s.p(), sys::NFTNL_SET_ID as u16, id);
        sys::nftnl_set_set_u32(s.p(), sys::NFTNL_SET_FLAGS as u16, NFT_SET_INTERVAL);
        sys::nftnl_set_set_u32(s.p(), sys::NFTNL_SET_KEY_TYPE as u16, key_type);
        sys::nftnl_set_set_u32(s.p(), sys::NFTNL_SET_KEY_LEN as u16, key_len);
        for e in elements {
            let elem = sys::nftnl_set_elem_alloc();
            if elem.is_null() {
                std::process::abort();
            }
            sys::nftnl_set_elem_set(
                elem,
                sys::NFTNL_SET_ELEM_KEY as u16,
                e.key.as_ptr() as *const c_void,
                e.key.len() as u32,
            );
            if e.end {
                sys::nftnl_set_elem_set_u32(
                    elem,
                    sys::NFTNL_SET_ELEM_FLAGS as u16,
                    libc::NFT_SET_ELEM_INTERVAL_END as u32,
                );
            }
            sys::nftnl_set_elem_add(s.p(), elem);
        }
    }
    s
}

fn expr(name: &CStr) -> *mut sys::nftnl_expr {
    let e = unsafe { sys::nftnl_expr_alloc(name.as_ptr()) };
    if e.is_null() {
        std::process::abort();
    }
    e
}

const REG1: u32 = libc::NFT_REG_1 as u32;

fn set_data(e: *mut sys::nftnl_expr, attr: u32, data: &[u8]) {
    unsafe {
        sys::nftnl_expr_set(
            e,
            attr as u16,
            data.as_ptr() as *const c_void,
            data.len() as u32,
        );
    }
}

/// One expression as a libnftnl object (`set_ids` names the sets of this batch).
fn expr_obj(x: &Expr, set_ids: &BTreeMap<String, u32>) -> Result<*mut sys::nftnl_expr, NftError> {
    let u32_ = |e: *mut sys::nftnl_expr, attr: u32, v: u32| unsafe {
        sys::nftnl_expr_set_u32(e, attr as u16, v)
    };
    Ok(match x {
        Expr::Meta(m) => {
            let e = expr(c"meta");
            let key = match m {
                Meta::IifName => libc::NFT_META_IIFNAME,
                Meta::OifName => libc::NFT_META_OIFNAME,
                Meta::NfProto => libc::NFT_META_NFPROTO,
                Meta::L4Proto => libc::NFT_META_L4PROTO,
            };
            u32_(e, sys::NFTNL_EXPR_META_KEY, key as u32);
            u32_(e, sys::NFTNL_EXPR_META_DREG, REG1);
            e
        }
        Expr::Payload { base, offset, len } => {
            let e = expr(c"payload");
            let b = match base {
                PayloadBase::Network => libc::NFT_PAYLOAD_NETWORK_HEADER,
                PayloadBase::Transport => libc::NFT_PAYLOAD_TRANSPORT_HEADER,
            };
            u32_(e, sys::NFTNL_EXPR_PAYLOAD_DREG, REG1);
            u32_(e, sys::NFTNL_EXPR_PAYLOAD_BASE, b as u32);
            u32_(e, sys::NFTNL_EXPR_PAYLOAD_OFFSET, *offset);
            u32_(e, sys::NFTNL_EXPR_PAYLOAD_LEN, *len);
            e
        }
        Expr::CtState => {
            let e = expr(c"ct");
            u32_(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_STATE as u32);
            u32_(e, sys::NFTNL_EXPR_CT_DREG, REG1);
            e
        }
        Expr::Bitwise { mask } => {
            let e = expr(c"bitwise");
            u32_(e, sys::NFTNL_EXPR_BITWISE_SREG, REG1);
            u32_(e, sys::NFTNL_EXPR_BITWISE_DREG, REG1);
            u32_(e, sys::NFTNL_EXPR_BITWISE_LEN, mask.len() as u32);
            set_data(e, sys::NFTNL_EXPR_BITWISE_MASK, mask);
            set_data(e, sys::NFTNL_EXPR_BITWISE_XOR, &vec![0u8; mask.len()]);
            e
        }
        Expr::Cmp { op, data } => {
            let e = expr(c"cmp");
            let op = match op {
                CmpOp::Eq => libc::NFT_CMP_EQ,
                CmpOp::Neq => libc::NFT_CMP_NEQ,
                CmpOp::Gte => libc::NFT_CMP_GTE,
                CmpOp::Lte => libc::NFT_CMP_LTE,
            };
            u32_(e, sys::NFTNL_EXPR_CMP_SREG, REG1);
            u32_(e, sys::NFTNL_EXPR_CMP_OP, op as u32);
            set_data(e, sys::NFTNL_EXPR_CMP_DATA, data);
            e
        }
        Expr::Lookup { set } => {
            let e = expr(c"lookup");
            let name = cstr(set)?;
            unsafe {
                sys::nftnl_expr_set_str(e, sys::NFTNL_EXPR_LOOKUP_SET as u16, name.as_ptr());
            }
            u32_(e, sys::NFTNL_EXPR_LOOKUP_SREG, REG1);
            if let Some(id) = set_ids.get(set) {
                u32_(e, sys::NFTNL_EXPR_LOOKUP_SET_ID, *id);
            }
            // The kernel reports the flags back; set them so both sides print alike.
            u32_(e, sys::NFTNL_EXPR_LOOKUP_FLAGS, 0);
            e
        }
        Expr::Accept | Expr::Drop | Expr::Jump(_) => {
            let e = expr(c"immediate");
            u32_(e, sys::NFTNL_EXPR_IMM_DREG, libc::NFT_REG_VERDICT as u32);
            let code = match x {
                Expr::Accept => libc::NF_ACCEPT,
                Expr::Drop => libc::NF_DROP,
                _ => libc::NFT_JUMP,
            };
            u32_(e, sys::NFTNL_EXPR_IMM_VERDICT, code as u32);
            if let Expr::Jump(chain) = x {
                let name = cstr(chain)?;
                unsafe {
                    sys::nftnl_expr_set_str(e, sys::NFTNL_EXPR_IMM_CHAIN as u16, name.as_ptr());
                }
            }
            e
        }
        Expr::Masquerade => expr(c"masq"),
    })
}

fn rule_obj(
    table: &CStr,
    chain: &CStr,
    exprs: &[Expr],
    set_ids: &BTreeMap<String, u32>,
) -> Result<Owned<sys::nftnl_rule>, NftError> {
    let r = Owned::new(unsafe { sys::nftnl_rule_alloc() });
    unsafe {
        sys::nftnl_rule_set_str(r.p(), sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
        sys::nftnl_rule_set_str(r.p(), sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
        sys::nftnl_rule_set_u32(r.p(), sys::NFTNL_RULE_FAMILY as u16, FAMILY as u32);
    }
    for x in exprs {
        let e = expr_obj(x, set_ids)?;
        // The rule owns its expressions from here on.
        unsafe { sys::nftnl_rule_add_expr(r.p(), e) };
    }
    Ok(r)
}

/// A rule's expressions as libnftnl prints them (the header line with table, chain and
/// handle left out): the form both sides of a comparison are brought to.
fn rule_text(r: *const sys::nftnl_rule) -> String {
    let mut buf = vec![0u8; 1 << 14];
    loop {
        let n = unsafe {
            sys::nftnl_rule_snprintf(
                buf.as_mut_ptr() as *mut c_char,
                buf.len(),
                r,
                sys::NFTNL_OUTPUT_DEFAULT,
                0,
            )
        };
        if n < 0 {
            return String::from("<unprintable rule>");
        }
        if (n as usize) < buf.len() {
            let text = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
            return match text.split_once('\n') {
                Some((_, exprs)) => exprs.split_whitespace().collect::<Vec<_>>().join(" "),
                None => String::new(),
            };
        }
        buf.resize(n as usize + 1, 0);
    }
}

// ------------------------------------------------------------------ images --

/// A table as compared: chains with their hook and rule texts, sets with their elements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Image {
    pub chains: BTreeMap<String, ChainImage>,
    pub sets: BTreeMap<String, SetImage>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainImage {
    /// (hook number, priority, type, policy) of a base chain.
    pub base: Option<(u32, i32, String, u32)>,
    pub rules: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetImage {
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    /// Sorted.
    pub elements: Vec<Element>,
}

/// The image the kernel should hold for `rs`.
pub fn image(rs: &Ruleset) -> Result<Image, NftError> {
    let table = cstr(&rs.table)?;
    let mut img = Image::default();
    let none = BTreeMap::new();
    for c in &rs.chains {
        let name = cstr(&c.name)?;
        let mut rules = Vec::with_capacity(c.rules.len());
        for r in &c.rules {
            rules.push(rule_text(rule_obj(&table, &name, r, &none)?.p()));
        }
        img.chains.insert(
            c.name.clone(),
            ChainImage {
                base: c.base.as_ref().map(|b| {
                    (
                        hooknum(b.hook),
                        b.priority,
                        chain_type(b.kind).to_string_lossy().into_owned(),
                        libc::NF_ACCEPT as u32,
                    )
                }),
                rules,
            },
        );
    }
    for s in &rs.sets {
        let (key_type, key_len) = s.key.nft();
        let mut elements = s.elements.clone();
        elements.sort();
        img.sets.insert(
            s.name.clone(),
            SetImage {
                flags: NFT_SET_INTERVAL,
                key_type,
                key_len,
                elements,
            },
        );
    }
    Ok(img)
}

// ------------------------------------------------------------------ messages --

/// A buffer of netlink messages, aligned for `nlmsghdr`, with room for the largest one.
struct MsgBuf {
    words: Vec<u64>,
    len: usize,
    count: usize,
}

impl MsgBuf {
    fn new() -> Self {
        MsgBuf {
            words: Vec::new(),
            len: 0,
            count: 0,
        }
    }

    /// Where the next message goes (room for the largest message guaranteed).
    fn tail(&mut self) -> *mut c_char {
        let need = self.len + nftnl::nft_nlmsg_maxsize() as usize + 8;
        if self.words.len() * 8 < need {
            self.words.resize(need.div_ceil(8) * 2, 0);
        }
        unsafe { (self.words.as_mut_ptr() as *mut u8).add(self.len) as *mut c_char }
    }

    /// Accounts for the message just built at `tail()`.
    fn commit(&mut self, hdr: *mut libc::nlmsghdr) {
        let len = unsafe { (*hdr).nlmsg_len } as usize;
        self.len += len.div_ceil(4) * 4;
        self.count += 1;
    }

    fn bytes(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

fn hdr(buf: &mut MsgBuf, kind: i32, flags: i32, seq: u32) -> *mut libc::nlmsghdr {
    unsafe { sys::nftnl_nlmsg_build_hdr(buf.tail(), kind as u16, FAMILY, flags as u16, seq) }
}

const ACK: i32 = libc::NLM_F_ACK;
const CREATE: i32 = libc::NLM_F_CREATE;

/// The batch that replaces the table (or only deletes it, with `rs` None): the table is
/// created if missing (so the delete cannot fail), deleted, and built again.
fn batch(table_name: &str, rs: Option<&Ruleset>) -> Result<MsgBuf, NftError> {
    let mut buf = MsgBuf::new();
    let mut seq = 1u32;
    let mut next = || {
        seq += 1;
        seq
    };
    let table = cstr(table_name)?;
    let t = table_obj(&table);
    let begin = unsafe { sys::nftnl_batch_begin(buf.tail(), next()) };
    buf.commit(begin);
    let h = hdr(&mut buf, libc::NFT_MSG_NEWTABLE, CREATE | ACK, next());
    unsafe { sys::nftnl_table_nlmsg_build_payload(h, t.p()) };
    buf.commit(h);
    let h = hdr(&mut buf, libc::NFT_MSG_DELTABLE, ACK, next());
    unsafe { sys::nftnl_table_nlmsg_build_payload(h, t.p()) };
    buf.commit(h);
    if let Some(rs) = rs {
        let h = hdr(&mut buf, libc::NFT_MSG_NEWTABLE, CREATE | ACK, next());
        unsafe { sys::nftnl_table_nlmsg_build_payload(h, t.p()) };
        buf.commit(h);
        for c in &rs.chains {
            let obj = chain_obj(&table, &cstr(&c.name)?, c.base.as_ref());
            let h = hdr(&mut buf, libc::NFT_MSG_NEWCHAIN, CREATE | ACK, next());
            unsafe { sys::nftnl_chain_nlmsg_build_payload(h, obj.p()) };
            buf.commit(h);
        }
        let mut set_ids = BTreeMap::new();
        for (i, s) in rs.sets.iter().enumerate() {
            let id = i as u32 + 1;
            set_ids.insert(s.name.clone(), id);
            let obj = set_obj(&table, &cstr(&s.name)?, id, s.key, &s.elements);
            let h = hdr(&mut buf, libc::NFT_MSG_NEWSET, CREATE | ACK, next());
            unsafe { sys::nftnl_set_nlmsg_build_payload(h, obj.p()) };
            buf.commit(h);
            // Elements in as many messages as their size needs.
            let iter = Owned::new(unsafe { sys::nftnl_set_elems_iter_create(obj.p()) });
            while !unsafe { sys::nftnl_set_elems_iter_cur(iter.p()) }.is_null() {
                let h = hdr(
                    &mut buf,
                    libc::NFT_MSG_NEWSETELEM,
                    CREATE | libc::NLM_F_EXCL | ACK,
                    next(),
                );
                let r = unsafe { sys::nftnl_set_elems_nlmsg_build_payload_iter(h, iter.p()) };
                buf.commit(h);
                if r <= 0 {
                    break;
                }
            }
        }
        for c in &rs.chains {
            let chain = cstr(&c.name)?;
            for r in &c.rules {
                let obj = rule_obj(&table, &chain, r, &set_ids)?;
                let h = hdr(
                    &mut buf,
                    libc::NFT_MSG_NEWRULE,
                    CREATE | libc::NLM_F_APPEND | ACK,
                    next(),
                );
                unsafe { sys::nftnl_rule_nlmsg_build_payload(h, obj.p()) };
                buf.commit(h);
            }
        }
    }
    let end = unsafe { sys::nftnl_batch_end(buf.tail(), next()) };
    buf.commit(end);
    Ok(buf)
}

// ------------------------------------------------------------------ socket --

/// A netfilter netlink socket (one per operation; cheap).
pub struct Socket {
    inner: mnl::Socket,
    seq: u32,
}

fn setsockopt(fd: i32, opt: i32, value: i32) {
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &value as *const i32 as *const c_void,
            std::mem::size_of::<i32>() as u32,
        );
    }
}

impl Socket {
    pub fn open() -> Result<Socket, NftError> {
        let inner = super::netfilter_socket().map_err(NftError::Socket)?;
        let fd = inner.as_raw_fd();
        setsockopt(fd, libc::SO_RCVBUFFORCE, 4 << 20);
        Ok(Socket { inner, seq: 0 })
    }

    fn fd(&self) -> i32 {
        self.inner.as_raw_fd()
    }

    /// Sends one batch in one `sendmsg` (the kernel commits a batch only if its begin and
    /// end arrive together) and collects every acknowledgement.
    fn send_batch(&mut self, buf: &MsgBuf) -> Result<(), NftError> {
        let bytes = buf.bytes();
        setsockopt(self.fd(), libc::SO_SNDBUFFORCE, bytes.len() as i32 + 4096);
        let sent = self.inner.send(bytes).map_err(NftError::Rejected)?;
        if sent < bytes.len() {
            return Err(NftError::Rejected(io::Error::other("short send")));
        }
        // Acks: one per message flagged NLM_F_ACK (all but the batch begin and end). The
        // kernel commits the batch before it answers the last one, or aborts all of it.
        let expect = buf.count - 2;
        let mut acked = 0usize;
        let mut rx = vec![0u64; 1 << 14];
        while acked < expect {
            let n = self.recv(&mut rx).map_err(NftError::Rejected)?;
            for msg in messages(&rx, n) {
                if let Some(code) = msg.error_code() {
                    if code != 0 {
                        return Err(NftError::Rejected(io::Error::from_raw_os_error(-code)));
                    }
                    acked += 1;
                }
            }
        }
        Ok(())
    }

    fn recv(&self, rx: &mut [u64]) -> io::Result<usize> {
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(rx.as_mut_ptr() as *mut u8, rx.len() * 8) };
        self.inner.recv_raw(bytes)
    }

    /// Replaces the table with `rs` in one batch.
    pub fn replace(&mut self, rs: &Ruleset) -> Result<WriteStats, NftError> {
        let buf = batch(&rs.table, Some(rs))?;
        self.send_batch(&buf)?;
        Ok(WriteStats {
            messages: buf.count,
            bytes: buf.len,
        })
    }

    /// Removes the table (nothing happens if it is absent).
    pub fn remove(&mut self, table: &str) -> Result<WriteStats, NftError> {
        let buf = batch(table, None)?;
        self.send_batch(&buf)?;
        Ok(WriteStats {
            messages: buf.count,
            bytes: buf.len,
        })
    }

    /// Sends a dump request and calls `each` with every answer message.
    fn dump(
        &mut self,
        kind: i32,
        build: impl FnOnce(*mut libc::nlmsghdr),
        mut each: impl FnMut(*const libc::nlmsghdr),
    ) -> Result<(), NftError> {
        self.seq = self.seq.wrapping_add(1);
        let mut buf = MsgBuf::new();
        let h = hdr(&mut buf, kind, libc::NLM_F_DUMP, self.seq);
        build(h);
        buf.commit(h);
        self.inner
            .send(buf.bytes())
            .map_err(|e| NftError::Read(e.to_string()))?;
        let mut rx = vec![0u64; 1 << 15];
        loop {
            let n = self
                .recv(&mut rx)
                .map_err(|e| NftError::Read(e.to_string()))?;
            for msg in messages(&rx, n) {
                match msg.kind() {
                    libc::NLMSG_DONE => return Ok(()),
                    libc::NLMSG_ERROR => match msg.error_code() {
                        Some(0) | None => {}
                        Some(code) if -code == libc::ENOENT => return Ok(()),
                        Some(code) => {
                            return Err(NftError::Read(
                                io::Error::from_raw_os_error(-code).to_string(),
                            ))
                        }
                    },
                    _ => each(msg.hdr),
                }
            }
        }
    }

    /// Reads the table back; None when it does not exist.
    pub fn read(&mut self, table: &str) -> Result<Option<Image>, NftError> {
        let name = cstr(table)?;
        let mut exists = false;
        self.dump(
            libc::NFT_MSG_GETTABLE,
            |_| {},
            |h| {
                let t = Owned::new(unsafe { sys::nftnl_table_alloc() });
                if unsafe { sys::nftnl_table_nlmsg_parse(h, t.p()) } >= 0
                    && unsafe { sys::nftnl_table_get_u32(t.p(), sys::NFTNL_TABLE_FAMILY as u16) }
                        == FAMILY as u32
                    && get_str(unsafe {
                        sys::nftnl_table_get_str(t.p(), sys::NFTNL_TABLE_NAME as u16)
                    }) == table
                {
                    exists = true;
                }
            },
        )?;
        if !exists {
            return Ok(None);
        }
        let mut img = Image::default();
        let ours = |tbl: *const c_char, fam: u32| get_str(tbl) == table && fam == FAMILY as u32;
        self.dump(
            libc::NFT_MSG_GETCHAIN,
            |_| {},
            |h| {
                let c = Owned::new(unsafe { sys::nftnl_chain_alloc() });
                if unsafe { sys::nftnl_chain_nlmsg_parse(h, c.p()) } < 0 {
                    return;
                }
                let get_u32 = |a: u32| unsafe { sys::nftnl_chain_get_u32(c.p(), a as u16) };
                let is = |a: u32| unsafe { sys::nftnl_chain_is_set(c.p(), a as u16) };
                if !ours(
                    unsafe { sys::nftnl_chain_get_str(c.p(), sys::NFTNL_CHAIN_TABLE as u16) },
                    get_u32(sys::NFTNL_CHAIN_FAMILY),
                ) {
                    return;
                }
                let cname = get_str(unsafe {
                    sys::nftnl_chain_get_str(c.p(), sys::NFTNL_CHAIN_NAME as u16)
                });
                let base = is(sys::NFTNL_CHAIN_HOOKNUM).then(|| {
                    (
                        get_u32(sys::NFTNL_CHAIN_HOOKNUM),
                        unsafe { sys::nftnl_chain_get_s32(c.p(), sys::NFTNL_CHAIN_PRIO as u16) },
                        get_str(unsafe {
                            sys::nftnl_chain_get_str(c.p(), sys::NFTNL_CHAIN_TYPE as u16)
                        }),
                        get_u32(sys::NFTNL_CHAIN_POLICY),
                    )
                });
                img.chains.insert(
                    cname,
                    ChainImage {
                        base,
                        rules: vec![],
                    },
                );
            },
        )?;
        let mut set_names = Vec::new();
        self.dump(
            libc::NFT_MSG_GETSET,
            |h| {
                let s = Owned::new(unsafe { sys::nftnl_set_alloc() });
                unsafe {
                    sys::nftnl_set_set_str(s.p(), sys::NFTNL_SET_TABLE as u16, name.as_ptr());
                    sys::nftnl_set_nlmsg_build_payload(h, s.p());
                }
            },
            |h| {
                let s = Owned::new(unsafe { sys::nftnl_set_alloc() });
                if unsafe { sys::nftnl_set_nlmsg_parse(h, s.p()) } < 0 {
                    return;
                }
                let get_u32 = |a: u32| unsafe { sys::nftnl_set_get_u32(s.p(), a as u16) };
                if !ours(
                    unsafe { sys::nftnl_set_get_str(s.p(), sys::NFTNL_SET_TABLE as u16) },
                    get_u32(sys::NFTNL_SET_FAMILY),
                ) {
                    return;
                }
                let sname =
                    get_str(unsafe { sys::nftnl_set_get_str(s.p(), sys::NFTNL_SET_NAME as u16) });
                set_names.push(sname.clone());
                img.sets.insert(
                    sname,
                    SetImage {
                        flags: get_u32(sys::NFTNL_SET_FLAGS),
                        key_type: get_u32(sys::NFTNL_SET_KEY_TYPE),
                        key_len: get_u32(sys::NFTNL_SET_KEY_LEN),
                        elements: vec![],
                    },
                );
            },
        )?;
        for sname in set_names {
            let set_c = cstr(&sname)?;
            let mut elements = Vec::new();
            self.dump(
                libc::NFT_MSG_GETSETELEM,
                |h| {
                    let s = Owned::new(unsafe { sys::nftnl_set_alloc() });
                    unsafe {
                        sys::nftnl_set_set_str(s.p(), sys::NFTNL_SET_TABLE as u16, name.as_ptr());
                        sys::nftnl_set_set_str(s.p(), sys::NFTNL_SET_NAME as u16, set_c.as_ptr());
                        sys::nftnl_set_elems_nlmsg_build_payload(h, s.p());
                    }
                },
                |h| {
                    let s = Owned::new(unsafe { sys::nftnl_set_alloc() });
                    if unsafe { sys::nftnl_set_elems_nlmsg_parse(h, s.p()) } < 0 {
                        return;
                    }
                    let iter = Owned::new(unsafe { sys::nftnl_set_elems_iter_create(s.p()) });
                    loop {
                        let e = unsafe { sys::nftnl_set_elems_iter_next(iter.p()) };
                        if e.is_null() {
                            break;
                        }
                        let mut len = 0u32;
                        let key = unsafe {
                            sys::nftnl_set_elem_get(e, sys::NFTNL_SET_ELEM_KEY as u16, &mut len)
                        };
                        let key = if key.is_null() {
                            vec![]
                        } else {
                            unsafe { std::slice::from_raw_parts(key as *const u8, len as usize) }
                                .to_vec()
                        };
                        let flags = if unsafe {
                            sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_FLAGS as u16)
                        } {
                            unsafe {
                                sys::nftnl_set_elem_get_u32(e, sys::NFTNL_SET_ELEM_FLAGS as u16)
                            }
                        } else {
                            0
                        };
                        elements.push(Element {
                            key,
                            end: flags & libc::NFT_SET_ELEM_INTERVAL_END as u32 != 0,
                        });
                    }
                },
            )?;
            elements.sort();
            if let Some(s) = img.sets.get_mut(&sname) {
                s.elements = elements;
            }
        }
        self.dump(
            libc::NFT_MSG_GETRULE,
            |h| {
                let r = Owned::new(unsafe { sys::nftnl_rule_alloc() });
                unsafe {
                    sys::nftnl_rule_set_str(r.p(), sys::NFTNL_RULE_TABLE as u16, name.as_ptr());
                    sys::nftnl_rule_nlmsg_build_payload(h, r.p());
                }
            },
            |h| {
                let r = Owned::new(unsafe { sys::nftnl_rule_alloc() });
                if unsafe { sys::nftnl_rule_nlmsg_parse(h, r.p()) } < 0 {
                    return;
                }
                if !ours(
                    unsafe { sys::nftnl_rule_get_str(r.p(), sys::NFTNL_RULE_TABLE as u16) },
                    unsafe { sys::nftnl_rule_get_u32(r.p(), sys::NFTNL_RULE_FAMILY as u16) },
                ) {
                    return;
                }
                let chain = get_str(unsafe {
                    sys::nftnl_rule_get_str(r.p(), sys::NFTNL_RULE_CHAIN as u16)
                });
                let text = rule_text(r.p());
                img.chains.entry(chain).or_default().rules.push(text);
            },
        )?;
        Ok(Some(img))
    }
}

fn get_str(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// One received netlink message.
struct Msg {
    hdr: *const libc::nlmsghdr,
    len: usize,
}

impl Msg {
    fn kind(&self) -> i32 {
        unsafe { (*self.hdr).nlmsg_type as i32 }
    }

    /// The error code of an NLMSG_ERROR (0 = an acknowledgement).
    fn error_code(&self) -> Option<i32> {
        if self.kind() != libc::NLMSG_ERROR || self.len < 20 {
            return None;
        }
        let p = unsafe { (self.hdr as *const u8).add(16) as *const i32 };
        Some(unsafe { p.read_unaligned() })
    }
}

/// Splits `n` received bytes into messages.
fn messages(rx: &[u64], n: usize) -> Vec<Msg> {
    let base = rx.as_ptr() as *const u8;
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 16 <= n {
        let h = unsafe { base.add(off) } as *const libc::nlmsghdr;
        let len = unsafe { (*h).nlmsg_len } as usize;
        if len < 16 || off + len > n {
            break;
        }
        out.push(Msg { hdr: h, len });
        off += len.div_ceil(4) * 4;
    }
    out
}

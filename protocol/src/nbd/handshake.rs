//! The fixed-newstyle handshake as a state machine: feed it what the
//! server sent, send what [`Handshake::poll_transmit`] returns, until
//! [`Handshake::finish`] gives the export.
//!
//! Order: greeting → client flags → `NBD_OPT_STRUCTURED_REPLY` →
//! `NBD_OPT_SET_META_CONTEXT` (when contexts are asked for) → `NBD_OPT_GO`.

use super::{be16, be32, be64, NbdError, MAX_OPTION_REPLY};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OLDSTYLE: u64 = 0x0000_4202_8186_1253;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// A metadata context the server granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContext {
    /// The id block-status chunks carry.
    pub id: u32,
    /// Its name (`base:allocation`, `qemu:dirty-bitmap:NAME`).
    pub name: String,
}

/// The export, once the handshake is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Block-size constraints (`NBD_INFO_BLOCK_SIZE`; 1, 4096, 32 MiB when not sent).
    pub min_block: u32,
    /// Preferred request size.
    pub preferred_block: u32,
    /// Largest request payload.
    pub max_block: u32,
    /// The contexts granted, in the order the server named them.
    pub contexts: Vec<MetaContext>,
}

impl Export {
    /// The id of a granted context.
    pub fn context(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|c| c.name == name).map(|c| c.id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    Reply(u32),
    Done,
    Failed,
}

/// The client's handshake.
#[derive(Debug)]
pub struct Handshake {
    export_name: String,
    queries: Vec<String>,
    state: State,
    input: Vec<u8>,
    output: Vec<u8>,
    contexts: Vec<MetaContext>,
    info: Option<(u64, u16)>,
    block: Option<(u32, u32, u32)>,
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an option",
    }
}

fn protocol(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

impl Handshake {
    /// A handshake for `export` asking for the metadata contexts `queries`
    /// (none: no block status).
    pub fn new(export: &str, queries: &[&str]) -> Handshake {
        Handshake {
            export_name: export.to_string(),
            queries: queries.iter().map(|q| q.to_string()).collect(),
            state: State::Greeting,
            input: Vec::new(),
            output: Vec::new(),
            contexts: Vec::new(),
            info: None,
            block: None,
        }
    }

    /// Bytes to send to the server, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.output.is_empty()).then(|| std::mem::take(&mut self.output))
    }

    /// Whether the handshake is over (successfully).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes the server sent beyond the handshake (the transmission phase's start).
    pub fn leftover(&self) -> &[u8] {
        &self.input
    }

    /// The export, once done.
    pub fn finish(&self) -> Option<Export> {
        let (size, flags) = self.info?;
        let (min_block, preferred_block, max_block) = self.block.unwrap_or((1, 4096, super::MAX_READ));
        (self.state == State::Done).then(|| Export {
            size,
            flags,
            min_block,
            preferred_block,
            max_block,
            contexts: self.contexts.clone(),
        })
    }

    /// Takes bytes from the server; an error ends the handshake.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), NbdError> {
        if self.state == State::Failed {
            return Err(protocol("the handshake already failed"));
        }
        self.input.extend_from_slice(data);
        let r = self.advance();
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    fn advance(&mut self) -> Result<(), NbdError> {
        loop {
            match self.state {
                State::Greeting => {
                    if self.input.len() < 16 {
                        return Ok(());
                    }
                    if be64(&self.input, 0) != NBDMAGIC {
                        return Err(protocol("no NBDMAGIC greeting: not an NBD server"));
                    }
                    match be64(&self.input, 8) {
                        IHAVEOPT => {}
                        OLDSTYLE => return Err(NbdError::Unsupported("the oldstyle handshake".into())),
                        m => return Err(protocol(format!("unknown handshake magic {m:#x}"))),
                    }
                    if self.input.len() < 18 {
                        return Ok(());
                    }
                    let flags = be16(&self.input, 16);
                    self.input.drain(..18);
                    if flags & FLAG_FIXED_NEWSTYLE == 0 {
                        return Err(NbdError::Unsupported("the fixed-newstyle handshake".into()));
                    }
                    let client = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
                    self.output.extend_from_slice(&client.to_be_bytes());
                    option(&mut self.output, OPT_STRUCTURED_REPLY, &[]);
                    self.state = State::Reply(OPT_STRUCTURED_REPLY);
                }
                State::Reply(opt) => {
                    if self.input.len() < 20 {
                        return Ok(());
                    }
                    let (magic, echoed, kind, len) =
                        (be64(&self.input, 0), be32(&self.input, 8), be32(&self.input, 12), be32(&self.input, 16));
                    if magic != OPTION_REPLY_MAGIC {
                        return Err(protocol(format!("bad option reply magic {magic:#x}")));
                    }
                    if echoed != opt {
                        return Err(protocol(format!("a reply to option {echoed} while {} was asked", opt_name(opt))));
                    }
                    if len > MAX_OPTION_REPLY {
                        return Err(protocol(format!("an option reply of {len} bytes")));
                    }
                    if self.input.len() < 20 + len as usize {
                        return Ok(());
                    }
                    let data: Vec<u8> = self.input[20..20 + len as usize].to_vec();
                    self.input.drain(..20 + len as usize);
                    self.on_reply(opt, kind, &data)?;
                }
                State::Done | State::Failed => return Ok(()),
            }
        }
    }

    fn on_reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> Result<(), NbdError> {
        if kind & REP_ERR_BIT != 0 {
            let message = String::from_utf8_lossy(data).into_owned();
            if opt == OPT_STRUCTURED_REPLY {
                return Err(NbdError::Unsupported(format!("structured replies ({message})")));
            }
            if opt == OPT_SET_META_CONTEXT {
                // Block status is optional: go on without it (everything
                // reads as data, hints are not used). An unknown export is
                // refused again by NBD_OPT_GO.
                self.contexts.clear();
                self.send_go();
                return Ok(());
            }
            return Err(NbdError::Refused { option: opt_name(opt), code: kind, message });
        }
        match (opt, kind) {
            (OPT_STRUCTURED_REPLY, REP_ACK) => {
                if self.queries.is_empty() {
                    self.send_go();
                } else {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(self.export_name.len() as u32).to_be_bytes());
                    d.extend_from_slice(self.export_name.as_bytes());
                    d.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
                    for q in &self.queries {
                        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                        d.extend_from_slice(q.as_bytes());
                    }
                    option(&mut self.output, OPT_SET_META_CONTEXT, &d);
                    self.state = State::Reply(OPT_SET_META_CONTEXT);
                }
            }
            (OPT_SET_META_CONTEXT, REP_META_CONTEXT) => {
                if data.len() < 4 {
                    return Err(protocol("a metadata context reply without its id"));
                }
                let name = String::from_utf8(data[4..].to_vec())
                    .map_err(|_| protocol("a metadata context name that is not UTF-8"))?;
                if !self.queries.contains(&name) {
                    return Err(protocol(format!("a metadata context {name:?} that was not asked for")));
                }
                // Each once: a server repeating one would grow the list
                // for as long as the handshake may take.
                if self.contexts.iter().any(|c| c.name == name) {
                    return Err(protocol(format!("the metadata context {name:?} granted twice")));
                }
                self.contexts.push(MetaContext { id: be32(data, 0), name });
            }
            (OPT_SET_META_CONTEXT, REP_ACK) => self.send_go(),
            (OPT_GO, REP_INFO) => {
                if data.len() < 2 {
                    return Err(protocol("an info reply without its type"));
                }
                match be16(data, 0) {
                    INFO_EXPORT if data.len() == 12 => self.info = Some((be64(data, 2), be16(data, 10))),
                    INFO_BLOCK_SIZE if data.len() == 14 => {
                        let (min, pref, max) = (be32(data, 2), be32(data, 6), be32(data, 10));
                        // The spec's bounds: a power-of-two minimum of at
                        // most 64 KiB, a power-of-two preferred size of at
                        // least 512, a maximum no smaller. A smaller maximum
                        // would split each block read into thousands of
                        // requests.
                        if min == 0
                            || !min.is_power_of_two()
                            || min > 64 << 10
                            || !pref.is_power_of_two()
                            || pref < min.max(512)
                            || max < pref
                        {
                            return Err(protocol(format!("block sizes min {min}, preferred {pref}, max {max}")));
                        }
                        self.block = Some((min, pref, max));
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => return Err(protocol("an info reply of the wrong length")),
                    // Other info is for other clients.
                    _ => {}
                }
            }
            (OPT_GO, REP_ACK) => {
                if self.info.is_none() {
                    return Err(protocol("NBD_OPT_GO ended without the export's size"));
                }
                self.state = State::Done;
            }
            (_, k) => return Err(protocol(format!("reply type {k} to {}", opt_name(opt)))),
        }
        Ok(())
    }

    fn send_go(&mut self) {
        let mut d = Vec::new();
        d.extend_from_slice(&(self.export_name.len() as u32).to_be_bytes());
        d.extend_from_slice(self.export_name.as_bytes());
        // Ask for the block-size info: a server may then hold us to it.
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        option(&mut self.output, OPT_GO, &d);
        self.state = State::Reply(OPT_GO);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What a well-behaved server sends for the handshake.
    pub(crate) fn server_bytes(size: u64, contexts: &[(u32, &str)]) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&NBDMAGIC.to_be_bytes());
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&3u16.to_be_bytes());
        let reply = |s: &mut Vec<u8>, opt: u32, kind: u32, data: &[u8]| {
            s.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
            s.extend_from_slice(&opt.to_be_bytes());
            s.extend_from_slice(&kind.to_be_bytes());
            s.extend_from_slice(&(data.len() as u32).to_be_bytes());
            s.extend_from_slice(data);
        };
        reply(&mut s, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        if !contexts.is_empty() {
            for (id, name) in contexts {
                let mut d = id.to_be_bytes().to_vec();
                d.extend_from_slice(name.as_bytes());
                reply(&mut s, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &d);
            }
            reply(&mut s, OPT_SET_META_CONTEXT, REP_ACK, &[]);
        }
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&1u16.to_be_bytes());
        reply(&mut s, OPT_GO, REP_INFO, &info);
        reply(&mut s, OPT_GO, REP_INFO, &block_sizes([1, 4096, 32 << 20]));
        reply(&mut s, OPT_GO, REP_ACK, &[]);
        s
    }

    fn block_sizes(sizes: [u32; 3]) -> Vec<u8> {
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in sizes {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        bs
    }

    #[test]
    fn block_sizes_outside_the_spec_and_repeated_contexts_are_refused() {
        let good = server_bytes(1 << 20, &[(1, "base:allocation")]);
        let at = good.windows(14).position(|w| w == block_sizes([1, 4096, 32 << 20])).unwrap();
        let with = |sizes: [u32; 3]| {
            let mut s = good.clone();
            s[at..at + 14].copy_from_slice(&block_sizes(sizes));
            let mut h = Handshake::new("disk", &["base:allocation"]);
            h.feed(&s).map(|_| h.finish().map(|e| e.max_block))
        };
        assert_eq!(with([1, 512, 512]).ok().flatten(), Some(512));
        assert_eq!(with([512, 4096, u32::MAX]).ok().flatten(), Some(u32::MAX));
        // Requests of a byte each, a minimum past 64 KiB, sizes not powers of two.
        for bad in [[1, 1, 1], [1, 256, 1 << 20], [128 << 10, 128 << 10, 1 << 20], [1, 3000, 1 << 20], [2, 4096, 2048]]
        {
            assert!(with(bad).is_err(), "{bad:?} was accepted");
        }
        let twice = server_bytes(1 << 20, &[(1, "base:allocation"), (2, "base:allocation")]);
        let mut h = Handshake::new("disk", &["base:allocation"]);
        assert!(h.feed(&twice).is_err(), "a context granted twice");
    }

    #[test]
    fn a_full_handshake_byte_by_byte() {
        let server = server_bytes(1 << 30, &[(7, "base:allocation")]);
        let mut h = Handshake::new("disk", &["base:allocation"]);
        let mut sent = Vec::new();
        for b in &server {
            h.feed(std::slice::from_ref(b)).unwrap_or_else(|e| panic!("{e}"));
            while let Some(o) = h.poll_transmit() {
                sent.extend(o);
            }
        }
        let e = h.finish().unwrap_or_else(|| panic!("not done"));
        assert_eq!(e.size, 1 << 30);
        assert_eq!(e.context("base:allocation"), Some(7));
        assert_eq!(e.max_block, 32 << 20);
        // client flags, then three options
        assert_eq!(&sent[..4], &[0, 0, 0, 3]);
        assert_eq!(sent.windows(8).filter(|w| *w == IHAVEOPT.to_be_bytes()).count(), 3);
    }

    #[test]
    fn hostile_handshakes_fail_cleanly() {
        let good = server_bytes(4096, &[(1, "base:allocation")]);
        let mut cases: Vec<Vec<u8>> = vec![b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()];
        let mut old = good.clone();
        old[8..16].copy_from_slice(&OLDSTYLE.to_be_bytes());
        cases.push(old);
        let mut huge = good.clone();
        huge[18 + 16..18 + 20].copy_from_slice(&u32::MAX.to_be_bytes());
        cases.push(huge);
        let mut wrong_opt = good.clone();
        wrong_opt[18 + 8..18 + 12].copy_from_slice(&99u32.to_be_bytes());
        cases.push(wrong_opt);
        let mut no_fixed = good.clone();
        no_fixed[17] = 0;
        cases.push(no_fixed);
        for (i, c) in cases.iter().enumerate() {
            let mut h = Handshake::new("disk", &["base:allocation"]);
            assert!(h.feed(c).is_err(), "case {i} was accepted");
            assert!(h.finish().is_none());
        }
        // A server without metadata contexts: the handshake goes on to GO,
        // which refuses an unknown export with the server's words.
        let mut s = good[..18 + 20].to_vec();
        let err = |s: &mut Vec<u8>, opt: u32| {
            s.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
            s.extend_from_slice(&opt.to_be_bytes());
            s.extend_from_slice(&(REP_ERR_BIT | 6).to_be_bytes());
            s.extend_from_slice(&4u32.to_be_bytes());
            s.extend_from_slice(b"nope");
        };
        err(&mut s, OPT_SET_META_CONTEXT);
        let mut h = Handshake::new("disk", &["base:allocation"]);
        h.feed(&s).unwrap_or_else(|e| panic!("{e}"));
        assert!(!h.is_done());
        err(&mut s, OPT_GO);
        let mut h = Handshake::new("disk", &["base:allocation"]);
        match h.feed(&s) {
            Err(NbdError::Refused { code, message, .. }) => assert!(code == REP_ERR_BIT | 6 && message == "nope"),
            other => panic!("{other:?}"),
        }
    }
}

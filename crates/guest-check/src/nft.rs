//! nftables over raw nfnetlink (no libnftnl, no `nft` binary): one transaction that creates an
//! IPv4 NAT chain on postrouting with a masquerade rule, and a dump that reads the rule back.
//!
//! This is what `nft add table ip t; nft add chain ip t post { type nat hook postrouting priority
//! srcnat; }; nft add rule ip t post masquerade` sends. The kernel validates each piece against
//! what it was built with: the `nat` chain type needs CONFIG_NFT_NAT, the `masq` expression
//! CONFIG_NFT_MASQ, the table itself CONFIG_NF_TABLES(_IPV4).
// `unsafe` is allowed in this module only: the checker probes the kernel with raw syscalls, which is what it exists to test; each block carries its `SAFETY:`.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

use netlink_packet_netfilter::nftables::{
    ChainAttribute, ExpressionAttribute, Expressions, Hook, InetHookNumber, ListAttribute, NfTablesMessage,
    RuleAttribute, RuleMessage, TableAttribute, TableMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST,
};
use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket};

pub const TABLE: &str = "openshell_check";
pub const CHAIN: &str = "postrouting";
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `srcnat`, where `nft` puts masquerade.
const PRIORITY_SRCNAT: i32 = 100;
const NF_ACCEPT: u32 = 1;

/// What went wrong, named by the step the kernel refused.
#[derive(Debug, PartialEq, Eq)]
pub enum NftError {
    /// No nfnetlink socket at all.
    Socket(String),
    /// The kernel refused one message of the transaction.
    Refused { step: Step, errno: i32 },
    /// The kernel did not answer (or answered with something unreadable).
    Protocol(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Table,
    NatChain,
    MasqRule,
}

impl Step {
    /// What it means, and the kernel option that provides it.
    pub fn describe(self) -> (&'static str, &'static str) {
        match self {
            Step::Table => ("creating table ip openshell_check", "CONFIG_NF_TABLES, CONFIG_NF_TABLES_IPV4"),
            Step::NatChain => ("creating a `type nat hook postrouting` chain", "CONFIG_NFT_NAT, CONFIG_NF_NAT"),
            Step::MasqRule => ("adding a `masquerade` rule", "CONFIG_NFT_MASQ"),
        }
    }
}

impl std::fmt::Display for NftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NftError::Socket(e) => write!(f, "socket(AF_NETLINK, NETLINK_NETFILTER): {e}"),
            NftError::Refused { step, errno } => {
                write!(f, "{}: {}", step.describe().0, std::io::Error::from_raw_os_error(*errno))
            }
            NftError::Protocol(e) => write!(f, "nfnetlink: {e}"),
        }
    }
}

fn nft(family: NetfilterProtoFamily, msg: NfTablesMessage, flags: u16, seq: u32) -> NetlinkMessage<NetfilterMessage> {
    control_or_nft(NetfilterHeader::new(family, 0, 0), msg.into(), flags, seq)
}

fn control_or_nft(
    header: NetfilterHeader,
    inner: NetfilterMessageInner,
    flags: u16,
    seq: u32,
) -> NetlinkMessage<NetfilterMessage> {
    let mut m = NetlinkMessage::from(NetfilterMessage::new(header, inner));
    m.header.flags = flags;
    m.header.sequence_number = seq;
    m.finalize();
    m
}

/// The transaction, in order; message `i` has sequence number `i + 1`. Every message inside the
/// batch asks for an ACK so a refusal can be pinned to its step.
pub fn masquerade_batch() -> Vec<(Option<Step>, NetlinkMessage<NetfilterMessage>)> {
    let v4 = NetfilterProtoFamily::IPv4;
    let batch = |m: ControlMessage, seq| {
        control_or_nft(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
            m.into(),
            NLM_F_REQUEST,
            seq,
        )
    };
    let table = NfTablesMessage::NewTable(TableMessage { attributes: vec![TableAttribute::Name(TABLE.into())] });
    let chain = NfTablesMessage::NewChain(netlink_packet_netfilter::nftables::ChainMessage {
        attributes: vec![
            ChainAttribute::Table(TABLE.into()),
            ChainAttribute::Name(CHAIN.into()),
            ChainAttribute::Hook(vec![
                Hook::Number(InetHookNumber::PostRouting.into()),
                Hook::Priority(PRIORITY_SRCNAT as u32),
            ]),
            ChainAttribute::Policy(NF_ACCEPT),
            ChainAttribute::Type("nat".into()),
        ],
    });
    let masq: ListAttribute<ExpressionAttribute> =
        Expressions::Other { expression_type: "masq".into(), attributes: vec![] }.into();
    let rule = NfTablesMessage::NewRule(RuleMessage {
        attributes: vec![
            RuleAttribute::Table(TABLE.into()),
            RuleAttribute::Chain(CHAIN.into()),
            RuleAttribute::Expressions(vec![masq]),
        ],
    });
    let create = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK;
    vec![
        (None, batch(ControlMessage::BatchBegin, 1)),
        (Some(Step::Table), nft(v4, table, create, 2)),
        (Some(Step::NatChain), nft(v4, chain, create, 3)),
        (Some(Step::MasqRule), nft(v4, rule, create | NLM_F_APPEND, 4)),
        (None, batch(ControlMessage::BatchEnd, 5)),
    ]
}

fn socket() -> Result<Socket, NftError> {
    let mut s = Socket::new(NETLINK_NETFILTER).map_err(|e| NftError::Socket(e.to_string()))?;
    s.bind_auto().map_err(|e| NftError::Socket(e.to_string()))?;
    // The kernel answers at once; a silent socket means a broken exchange, not a slow one.
    let tv = libc::timeval { tv_sec: 3, tv_usec: 0 };
    // SAFETY: setsockopt reads the timeval we own for its stated size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(s)
}

fn send_all(s: &Socket, msgs: &[NetlinkMessage<NetfilterMessage>]) -> Result<(), NftError> {
    let mut buf = Vec::new();
    for m in msgs {
        let start = buf.len();
        buf.resize(start + m.buffer_len(), 0);
        m.serialize(&mut buf[start..]);
    }
    s.send(&buf, 0).map_err(|e| NftError::Protocol(format!("send: {e}")))?;
    Ok(())
}

/// Every netlink message in one datagram.
fn messages(mut bytes: &[u8]) -> Result<Vec<NetlinkMessage<NetfilterMessage>>, NftError> {
    let mut out = Vec::new();
    while bytes.len() >= 16 {
        let len = u32::from_ne_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        if len < 16 || len > bytes.len() {
            return Err(NftError::Protocol(format!("truncated message ({len} of {} bytes)", bytes.len())));
        }
        let m = NetlinkMessage::<NetfilterMessage>::deserialize(&bytes[..len])
            .map_err(|e| NftError::Protocol(format!("unreadable answer: {e}")))?;
        out.push(m);
        let aligned = (len + 3) & !3;
        bytes = bytes.get(aligned..).unwrap_or(&[]);
    }
    Ok(out)
}

fn recv(s: &Socket) -> Result<Vec<NetlinkMessage<NetfilterMessage>>, NftError> {
    let mut buf = vec![0u8; 65536];
    let n = s.recv(&mut &mut buf[..], 0).map_err(|e| NftError::Protocol(format!("no answer from the kernel: {e}")))?;
    messages(&buf[..n])
}

/// Decides a transaction from the ACKs (errno 0) and errors the kernel sent back, by sequence
/// number: the first refused step wins; all steps acknowledged means committed.
pub fn verdict(steps: &[(u32, Step)], answers: &[(u32, i32)]) -> Result<(), NftError> {
    for (seq, step) in steps {
        match answers.iter().find(|(s, _)| s == seq) {
            Some((_, 0)) => {}
            Some((_, errno)) => return Err(NftError::Refused { step: *step, errno: *errno }),
            None => {
                // A refusal aborts the batch; the steps after it may stay unanswered.
                if let Some((s, errno)) = answers.iter().find(|(_, e)| *e != 0) {
                    let step = steps.iter().find(|(q, _)| q == s).map_or(*step, |(_, st)| *st);
                    return Err(NftError::Refused { step, errno: *errno });
                }
                return Err(NftError::Protocol(format!("no answer for {}", step.describe().0)));
            }
        }
    }
    Ok(())
}

/// Installs the masquerade transaction in the current network namespace.
pub fn install_masquerade() -> Result<(), NftError> {
    let s = socket()?;
    let batch = masquerade_batch();
    let steps: Vec<(u32, Step)> =
        batch.iter().filter_map(|(step, m)| step.map(|st| (m.header.sequence_number, st))).collect();
    send_all(&s, &batch.into_iter().map(|(_, m)| m).collect::<Vec<_>>())?;
    let mut answers: Vec<(u32, i32)> = Vec::new();
    while answers.len() < steps.len() {
        let got = match recv(&s) {
            Ok(got) => got,
            // Every answer the kernel had is in; let the verdict name what is missing.
            Err(_) if !answers.is_empty() => break,
            Err(e) => return Err(e),
        };
        for m in got {
            if let NetlinkPayload::Error(e) = m.payload {
                answers.push((m.header.sequence_number, e.code.map_or(0, |c| -c.get())));
            }
        }
        if answers.iter().any(|(_, e)| *e != 0) {
            break;
        }
    }
    verdict(&steps, &answers)
}

/// Lists the rules of our chain back from the kernel and returns the expression names of each.
pub fn list_rules() -> Result<Vec<Vec<String>>, NftError> {
    let s = socket()?;
    let get = NfTablesMessage::GetRule(RuleMessage {
        attributes: vec![RuleAttribute::Table(TABLE.into()), RuleAttribute::Chain(CHAIN.into())],
    });
    send_all(&s, &[nft(NetfilterProtoFamily::IPv4, get, NLM_F_REQUEST | NLM_F_DUMP, 1)])?;
    let mut rules = Vec::new();
    loop {
        for m in recv(&s)? {
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(rules),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    let errno = e.code.map_or(0, |c| -c.get());
                    return Err(NftError::Protocol(format!(
                        "listing rules: {}",
                        std::io::Error::from_raw_os_error(errno)
                    )));
                }
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewRule(rule)),
                    ..
                }) => rules.push(expression_names(&rule)),
                _ => {}
            }
        }
    }
}

fn expression_names(rule: &RuleMessage) -> Vec<String> {
    let mut names = Vec::new();
    for attr in &rule.attributes {
        if let RuleAttribute::Expressions(list) = attr {
            for item in list {
                if let ListAttribute::Element(expr) = item {
                    for a in expr {
                        if let ExpressionAttribute::Name(n) = a {
                            names.push(n.clone());
                        }
                    }
                }
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_framed_by_begin_and_end_on_the_nftables_subsystem() {
        let b = masquerade_batch();
        assert_eq!(b.len(), 5);
        // NFNL_MSG_BATCH_BEGIN = 16, BATCH_END = 17, subsystem 0 in the type, nftables in res_id.
        assert_eq!(b[0].1.header.message_type, 16);
        assert_eq!(b[4].1.header.message_type, 17);
        // NFT_MSG_NEWTABLE / NEWCHAIN / NEWRULE on subsystem 10.
        let types: Vec<u16> = b[1..4].iter().map(|(_, m)| m.header.message_type).collect();
        assert_eq!(types, [10 << 8, (10 << 8) | 3, (10 << 8) | 6]);
        assert!(b[1..4].iter().all(|(_, m)| m.header.flags & NLM_F_ACK != 0));
        let seqs: Vec<u32> = b.iter().map(|(_, m)| m.header.sequence_number).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn masq_rule_round_trips_with_its_expression_name() {
        let b = masquerade_batch();
        let m = &b[3].1;
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        let back = messages(&buf).unwrap();
        match &back[0].payload {
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewRule(rule)),
                ..
            }) => assert_eq!(expression_names(rule), ["masq"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn verdict_names_the_refused_step() {
        let steps = [(2, Step::Table), (3, Step::NatChain), (4, Step::MasqRule)];
        assert_eq!(verdict(&steps, &[(2, 0), (3, 0), (4, 0)]), Ok(()));
        assert_eq!(
            verdict(&steps, &[(2, 0), (3, 0), (4, libc::ENOENT)]),
            Err(NftError::Refused { step: Step::MasqRule, errno: libc::ENOENT })
        );
        // The chain was refused and the batch aborted before the rule was answered.
        assert_eq!(
            verdict(&steps, &[(2, 0), (3, libc::ENOENT)]),
            Err(NftError::Refused { step: Step::NatChain, errno: libc::ENOENT })
        );
        assert!(matches!(verdict(&steps, &[]), Err(NftError::Protocol(_))));
    }
}

//! A small, defensive DNS message parser: just what the forwarder needs (the question of a query, the
//! A/AAAA/CNAME records of an answer) and a REFUSED reply.
//!
//! Every byte may come from a hostile guest or a confused upstream: all reads are bounds-checked,
//! compression pointers may only point backwards and are followed at most [`MAX_POINTER_JUMPS`]
//! times, names are at most 255 bytes, and nothing here panics or allocates more than the message's
//! own size allows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// How many compression pointers one name may follow.
pub const MAX_POINTER_JUMPS: usize = 32;
/// The largest number of resource records read from one section (the rest are ignored).
pub const MAX_RECORDS: usize = 256;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// Why a message could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The message ends before a field it announces.
    #[error("DNS message is truncated")]
    Truncated,
    /// A name is malformed (label type, pointer loop, over 255 bytes).
    #[error("DNS name is malformed")]
    BadName,
    /// The message is not what was expected here (a response where a query belongs, no question).
    #[error("DNS message is not a {0}")]
    Unexpected(&'static str),
}

/// The fixed 12-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message id (an answer carries its query's).
    pub id: u16,
    /// QR, opcode, AA, TC, RD, RA, Z, RCODE.
    pub flags: u16,
    /// Number of questions.
    pub qdcount: u16,
    /// Number of answer records.
    pub ancount: u16,
    /// Number of authority records.
    pub nscount: u16,
    /// Number of additional records.
    pub arcount: u16,
}

impl Header {
    /// Reads the header of `msg`.
    pub fn parse(msg: &[u8]) -> Result<Self, DnsError> {
        let mut r = Reader { msg, pos: 0 };
        Ok(Header {
            id: r.u16()?,
            flags: r.u16()?,
            qdcount: r.u16()?,
            ancount: r.u16()?,
            nscount: r.u16()?,
            arcount: r.u16()?,
        })
    }
    /// QR bit: this is a response.
    pub fn is_response(&self) -> bool {
        self.flags & 0x8000 != 0
    }
    /// The opcode (0 = standard query).
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }
    /// The response code.
    pub fn rcode(&self) -> u8 {
        (self.flags & 0xf) as u8
    }
}

/// The question of a message: lowercase name without the trailing dot (`""` is the root), type, class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Lowercase name without the trailing dot.
    pub name: String,
    /// Query type (1 = A, 28 = AAAA, ...).
    pub qtype: u16,
    /// Query class (1 = IN).
    pub qclass: u16,
}

/// What a record carries, as far as the forwarder cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(Ipv6Addr),
    /// The canonical name (lowercase, no trailing dot).
    Cname(String),
    /// Any other type (or class), not decoded.
    Other(u16),
}

/// One answer-section record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Owner name (lowercase, no trailing dot).
    pub name: String,
    /// Time to live in seconds (values over 2^31 - 1 read as 0).
    pub ttl: u32,
    /// The record's data.
    pub data: RData,
}

/// A parsed response: header, first question, answer records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The header.
    pub header: Header,
    /// The first question, if any.
    pub question: Option<Question>,
    /// The answer section (at most [`MAX_RECORDS`]).
    pub answers: Vec<Record>,
}

struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DnsError> {
        let end = self.pos.checked_add(n).ok_or(DnsError::Truncated)?;
        let s = self.msg.get(self.pos..end).ok_or(DnsError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, DnsError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DnsError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Reads a (possibly compressed) name starting at the current position.
    fn name(&mut self) -> Result<String, DnsError> {
        let (name, end) = read_name(self.msg, self.pos)?;
        self.pos = end;
        Ok(name)
    }
}

/// Reads the name at `start`; returns it (lowercase, dot-separated, labels with bytes outside
/// `[a-z0-9_-]` escaped as `\DDD` so they can never equal a listed domain) and the offset just past
/// the name in the original position.
fn read_name(msg: &[u8], start: usize) -> Result<(String, usize), DnsError> {
    let mut out = String::new();
    let mut pos = start;
    let mut end_after: Option<usize> = None;
    let mut jumps = 0usize;
    let mut wire_len = 1usize; // the final root label
    loop {
        let len = *msg.get(pos).ok_or(DnsError::Truncated)?;
        match len & 0xc0 {
            0x00 => {
                if len == 0 {
                    let end = end_after.unwrap_or(pos + 1);
                    return Ok((out, end));
                }
                let l = len as usize;
                wire_len += l + 1;
                if wire_len > 255 {
                    return Err(DnsError::BadName);
                }
                let label = msg.get(pos + 1..pos + 1 + l).ok_or(DnsError::Truncated)?;
                if !out.is_empty() {
                    out.push('.');
                }
                for &b in label {
                    let b = b.to_ascii_lowercase();
                    if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' {
                        out.push(b as char);
                    } else {
                        out.push_str(&format!("\\{b:03}"));
                    }
                }
                pos += 1 + l;
            }
            0xc0 => {
                let lo = *msg.get(pos + 1).ok_or(DnsError::Truncated)?;
                let target = (((len & 0x3f) as usize) << 8) | lo as usize;
                // Pointers must point strictly backwards: no loops, bounded work.
                if target >= pos {
                    return Err(DnsError::BadName);
                }
                jumps += 1;
                if jumps > MAX_POINTER_JUMPS {
                    return Err(DnsError::BadName);
                }
                if end_after.is_none() {
                    end_after = Some(pos + 2);
                }
                pos = target;
            }
            _ => return Err(DnsError::BadName),
        }
    }
}

fn read_question(r: &mut Reader<'_>) -> Result<Question, DnsError> {
    let name = r.name()?;
    let qtype = r.u16()?;
    let qclass = r.u16()?;
    Ok(Question { name, qtype, qclass })
}

/// Parses a query: it must be a standard query (QR=0, opcode 0) with at least one question; returns
/// its header and first question.
pub fn parse_query(msg: &[u8]) -> Result<(Header, Question), DnsError> {
    let header = Header::parse(msg)?;
    if header.is_response() || header.opcode() != 0 {
        return Err(DnsError::Unexpected("standard query"));
    }
    if header.qdcount == 0 {
        return Err(DnsError::Unexpected("query with a question"));
    }
    let mut r = Reader { msg, pos: 12 };
    let q = read_question(&mut r)?;
    Ok((header, q))
}

/// Parses a response: header, first question (other questions skipped), answer section (at most
/// [`MAX_RECORDS`] records). Authority and additional sections are not read: only answers count.
pub fn parse_response(msg: &[u8]) -> Result<Response, DnsError> {
    let header = Header::parse(msg)?;
    if !header.is_response() {
        return Err(DnsError::Unexpected("response"));
    }
    let mut r = Reader { msg, pos: 12 };
    let mut question = None;
    for i in 0..header.qdcount as usize {
        if i >= MAX_RECORDS {
            return Err(DnsError::Unexpected("response with a sane question count"));
        }
        let q = read_question(&mut r)?;
        if question.is_none() {
            question = Some(q);
        }
    }
    let mut answers = Vec::new();
    for _ in 0..(header.ancount as usize).min(MAX_RECORDS) {
        let name = r.name()?;
        let rtype = r.u16()?;
        let class = r.u16()?;
        let ttl = r.u32()?;
        let rdlen = r.u16()? as usize;
        let rdstart = r.pos;
        let rdata = r.take(rdlen)?;
        let data = match (rtype, class) {
            (TYPE_A, CLASS_IN) if rdlen == 4 => RData::A(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
            (TYPE_AAAA, CLASS_IN) if rdlen == 16 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(rdata);
                RData::Aaaa(Ipv6Addr::from(b))
            }
            (TYPE_CNAME, CLASS_IN) => {
                let (target, end) = read_name(msg, rdstart)?;
                if end > rdstart + rdlen {
                    return Err(DnsError::BadName);
                }
                RData::Cname(target)
            }
            (t, _) => RData::Other(t),
        };
        // TTLs with the top bit set are treated as 0 (RFC 2181 §8).
        let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
        answers.push(Record { name, ttl, data });
    }
    Ok(Response {
        header,
        question,
        answers,
    })
}

/// Whether `name` is `domain` or a subdomain of it (label-wise: `aok.test` is not under `ok.test`).
pub fn name_matches(name: &str, domain: &str) -> bool {
    let name = name.trim_end_matches('.');
    let domain = domain.trim_end_matches('.');
    if domain.is_empty() {
        return false;
    }
    name.eq_ignore_ascii_case(domain)
        || (name.len() > domain.len()
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
            && name[name.len() - domain.len()..].eq_ignore_ascii_case(domain))
}

/// The addresses a response makes reachable under an allow list of `domains`: only if the question
/// name is listed (exact or subdomain), the A/AAAA records of that name and of the CNAME chain that
/// starts from it inside the answer section. Each address comes with the smallest TTL along its
/// chain. Records not connected to the question are ignored (a resolver cannot smuggle in addresses
/// for other names).
pub fn allowed_addresses(resp: &Response, domains: &[String]) -> Vec<(IpAddr, u32)> {
    let Some(q) = &resp.question else {
        return Vec::new();
    };
    if resp.header.rcode() != 0 || !domains.iter().any(|d| name_matches(&q.name, d)) {
        return Vec::new();
    }
    // Names on the chain, each with the smallest TTL that led to it.
    let mut chain: Vec<(String, u32)> = vec![(q.name.clone(), u32::MAX)];
    // Follow CNAMEs to a fixpoint; bounded by the number of records.
    for _ in 0..resp.answers.len().min(MAX_RECORDS) {
        let mut grew = false;
        for rec in &resp.answers {
            if let RData::Cname(target) = &rec.data
                && let Some(ttl) = chain.iter().find(|(n, _)| *n == rec.name).map(|(_, t)| *t)
                && !chain.iter().any(|(n, _)| n == target)
            {
                chain.push((target.clone(), ttl.min(rec.ttl)));
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
    let mut out: Vec<(IpAddr, u32)> = Vec::new();
    for rec in &resp.answers {
        let ip = match rec.data {
            RData::A(a) => IpAddr::V4(a),
            RData::Aaaa(a) => IpAddr::V6(a),
            _ => continue,
        };
        if let Some((_, t)) = chain.iter().find(|(n, _)| *n == rec.name) {
            let ttl = (*t).min(rec.ttl);
            match out.iter_mut().find(|(a, _)| *a == ip) {
                Some(e) => e.1 = e.1.max(ttl),
                None => out.push((ip, ttl)),
            }
        }
    }
    out
}

/// Response code REFUSED.
pub const RCODE_REFUSED: u8 = 5;
/// Response code SERVFAIL.
pub const RCODE_SERVFAIL: u8 = 2;

/// A REFUSED answer to `query` (same id and question, RD copied, no records), or `None` when the
/// query is not a standard query with a readable question.
pub fn refused(query: &[u8]) -> Option<Vec<u8>> {
    error_reply(query, RCODE_REFUSED)
}

/// An answer to `query` with no records and response code `rcode` (same id and question, RD copied),
/// or `None` when the query is not a standard query with a readable question.
pub fn error_reply(query: &[u8], rcode: u8) -> Option<Vec<u8>> {
    let (h, _) = parse_query(query).ok()?;
    // Length of the first question on the wire.
    let (_, name_end) = read_name(query, 12).ok()?;
    let qend = name_end.checked_add(4)?;
    let question = query.get(12..qend)?;
    let mut out = Vec::with_capacity(12 + question.len());
    out.extend_from_slice(&h.id.to_be_bytes());
    // QR=1, opcode 0, RD copied, RA=1, RCODE.
    let flags: u16 = 0x8000 | (h.flags & 0x0100) | 0x0080 | (rcode & 0xf) as u16;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(question);
    Some(out)
}

/// Builds a standard recursive query for `name` (type `qtype`, class IN) with `id`. For tests and
/// tools; returns `None` for a name that is not encodable (empty label, label over 63 bytes).
pub fn build_query(id: u16, name: &str, qtype: u16) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(12 + name.len() + 6);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x0100u16.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    encode_name(&mut out, name)?;
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Some(out)
}

/// Appends `name` in wire format (no compression).
pub fn encode_name(out: &mut Vec<u8>, name: &str) -> Option<()> {
    let name = name.trim_end_matches('.');
    if !name.is_empty() {
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A response to `query` with the given (name, ttl, rdata) records; names uncompressed except
    /// where a test writes pointers by hand.
    fn response(query: &[u8], records: &[(&str, u32, RData)]) -> Vec<u8> {
        let (_, name_end) = read_name(query, 12).unwrap();
        let mut out = query[..name_end + 4].to_vec();
        out[2] |= 0x80;
        out[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        for (name, ttl, data) in records {
            encode_name(&mut out, name).unwrap();
            let (t, rd) = match data {
                RData::A(a) => (TYPE_A, a.octets().to_vec()),
                RData::Aaaa(a) => (TYPE_AAAA, a.octets().to_vec()),
                RData::Cname(c) => {
                    let mut v = Vec::new();
                    encode_name(&mut v, c).unwrap();
                    (TYPE_CNAME, v)
                }
                RData::Other(t) => (*t, vec![1, 2, 3]),
            };
            out.extend_from_slice(&t.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(rd.len() as u16).to_be_bytes());
            out.extend_from_slice(&rd);
        }
        out
    }

    #[test]
    fn query_round_trip_and_refused() {
        let q = build_query(0x1234, "Ok.Test", TYPE_A).unwrap();
        let (h, question) = parse_query(&q).unwrap();
        assert_eq!(h.id, 0x1234);
        assert_eq!(question.name, "ok.test");
        let r = refused(&q).unwrap();
        let resp = parse_response(&r).unwrap();
        assert_eq!(resp.header.id, 0x1234);
        assert_eq!(resp.header.rcode(), 5);
        assert_eq!(resp.question.unwrap().name, "ok.test");
        assert!(parse_query(&r).is_err(), "a response is not a query");
    }

    #[test]
    fn cname_chain_and_unrelated_records() {
        let q = build_query(1, "www.ok.test", TYPE_A).unwrap();
        let r = response(
            &q,
            &[
                ("www.ok.test", 300, RData::Cname("cdn.example".into())),
                ("cdn.example", 60, RData::A(Ipv4Addr::new(198, 51, 100, 7))),
                ("evil.example", 60, RData::A(Ipv4Addr::new(198, 51, 100, 9))),
                ("cdn.example", 600, RData::Aaaa("2001:db8::1".parse().unwrap())),
            ],
        );
        let resp = parse_response(&r).unwrap();
        let got = allowed_addresses(&resp, &["ok.test".into()]);
        assert_eq!(
            got,
            vec![
                (IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 60),
                ("2001:db8::1".parse().unwrap(), 300)
            ]
        );
        assert!(allowed_addresses(&resp, &["other.test".into()]).is_empty());
        assert!(allowed_addresses(&resp, &["www.ok.test.evil".into()]).is_empty());
    }

    #[test]
    fn matching_is_label_wise() {
        assert!(name_matches("ok.test", "ok.test"));
        assert!(name_matches("a.b.ok.test", "ok.test"));
        assert!(!name_matches("aok.test", "ok.test"));
        assert!(!name_matches("ok.test.evil", "ok.test"));
        assert!(!name_matches("test", "ok.test"));
        assert!(!name_matches("ok\\046test", "ok.test"));
    }

    #[test]
    fn pointers() {
        let q = build_query(7, "ok.test", TYPE_A).unwrap();
        let mut r = q.clone();
        r[2] |= 0x80;
        r[7] = 1;
        // Owner: pointer to the question name at offset 12.
        r.extend_from_slice(&[0xc0, 12]);
        r.extend_from_slice(&TYPE_A.to_be_bytes());
        r.extend_from_slice(&CLASS_IN.to_be_bytes());
        r.extend_from_slice(&30u32.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&[198, 51, 100, 7]);
        let resp = parse_response(&r).unwrap();
        assert_eq!(resp.answers[0].name, "ok.test");
        // A pointer to itself (a loop) is rejected, not followed.
        let mut bad = r.clone();
        let at = q.len();
        bad[at] = 0xc0 | ((at >> 8) as u8);
        bad[at + 1] = at as u8;
        assert_eq!(parse_response(&bad), Err(DnsError::BadName));
    }

    proptest! {
        #[test]
        fn never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_query(&bytes);
            if let Ok(r) = parse_response(&bytes) {
                let _ = allowed_addresses(&r, &["ok.test".to_string()]);
            }
            let _ = refused(&bytes);
        }

        #[test]
        fn never_panics_on_mutated_responses(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
        ) {
            let q = build_query(9, "www.ok.test", TYPE_A).unwrap();
            let mut r = response(&q, &[
                ("www.ok.test", 300, RData::Cname("cdn.ok.test".into())),
                ("cdn.ok.test", 60, RData::A(Ipv4Addr::new(198, 51, 100, 7))),
            ]);
            for (i, b) in flips {
                let n = r.len();
                r[i % n] = b;
            }
            r.truncate(cut % (r.len() + 1));
            if let Ok(resp) = parse_response(&r) {
                let _ = allowed_addresses(&resp, &["ok.test".to_string()]);
                for a in &resp.answers {
                    prop_assert!(a.name.len() <= 255 * 4);
                }
            }
            let _ = refused(&r);
        }

        #[test]
        fn names_round_trip(labels in proptest::collection::vec("[a-z0-9-]{1,20}", 1..6)) {
            let name = labels.join(".");
            let q = build_query(3, &name, TYPE_AAAA).unwrap();
            let (_, question) = parse_query(&q).unwrap();
            prop_assert_eq!(question.name, name);
        }
    }
}

//! Property tests of the codec: generated request heads (random whitespace, bytes, duplicate
//! and conflicting framing fields, obs-fold, codings), response heads and chunked bodies. For
//! every input: no panic; whatever is accepted goes out canonical; and a strict second reading
//! (httparse over what is forwarded) frames it exactly as the proxy did.

use bytes::BytesMut;
use proptest::prelude::*;

use super::chunked::{self, Chunk, Step};
use super::request::{self, BodyFraming, Options};
use super::response::{self, ClientFraming};
use super::rewrite::{self, Forwarding};

fn opts() -> Options<'static> {
    Options {
        max_header_bytes: 16 * 1024,
        router: &super::request::OnePool(Some("srv")),
        log: true,
        forwarding: Forwarding { client_ip: b"10.0.0.9", proto: "http" },
        redirect_https: None,
        serves_host: None,
    }
}

/// Whitespace and look-alikes around values: SP, HTAB, NBSP (C2 A0), NEL (C2 85), VT, FF, NUL.
fn pad() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop::sample::select(vec![&b""[..], b" ", b"\t", b"\xc2\xa0", b"\xc2\x85", b"\x0b", b"\x0c", b"\0", b"\r"]),
        0..3,
    )
    .prop_map(|v| v.concat())
}

/// A framing-relevant field with odd spellings.
fn framing_field() -> impl Strategy<Value = Vec<u8>> {
    let name = prop::sample::select(vec![
        &b"Content-Length"[..],
        b"content-length",
        b"Content-Length ",
        b"Transfer-Encoding",
        b"transfer-encoding",
        b"Transfer_Encoding",
        b"Connection",
        b"Host",
        b"Expect",
        b"Upgrade",
        b"X-Forwarded-For",
        b"Cookie",
    ]);
    let value = prop::sample::select(vec![
        &b"5"[..],
        b"0",
        b"+5",
        b"5,5",
        b"18446744073709551616",
        b"chunked",
        b"gzip, chunked",
        b"chunked, chunked",
        b"chunked, gzip",
        b"Chunked",
        b"identity",
        b"close",
        b"keep-alive, Content-Length",
        b"upgrade",
        b"websocket",
        b"h2c",
        b"100-continue",
        b"a.example",
        b"a.example, b.example",
        b"srv=abc; x=1",
        b"1.1.1.1",
    ]);
    let fold = prop::sample::select(vec![&b""[..], b"\r\n x", b"\r\n\tx"]);
    (name, pad(), value, pad(), fold).prop_map(|(n, p1, v, p2, f)| [n, b":", &p1, v, &p2, f].concat())
}

fn request_head() -> impl Strategy<Value = Vec<u8>> {
    let line = prop::sample::select(vec![
        &b"GET / HTTP/1.1"[..],
        b"POST /upload?x=1 HTTP/1.1",
        b"POST / HTTP/1.0",
        b"GET http://a.example/p HTTP/1.1",
        b"GET http://u@a.example/ HTTP/1.1",
        b"CONNECT a:443 HTTP/1.1",
        b"GET /\xc2\xa0 HTTP/1.1",
    ]);
    let ending = prop::sample::select(vec![&b"\r\n"[..], b"\n"]);
    (line, prop::collection::vec(framing_field(), 0..6), ending).prop_map(|(l, fields, eol)| {
        let mut head = l.to_vec();
        head.extend_from_slice(eol);
        for f in fields {
            head.extend_from_slice(&f);
            head.extend_from_slice(eol);
        }
        head.extend_from_slice(eol);
        head
    })
}

/// The framing a strict reader takes from a forwarded head; panics if it is not canonical.
fn strict_framing(head: &[u8]) -> BodyFraming {
    let mut slots = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut slots);
    let n = match req.parse(head) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("forwarded head does not parse: {other:?} {:?}", String::from_utf8_lossy(head)),
    };
    assert_eq!(n, head.len(), "one head, nothing after it");
    assert!(!head.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'), "bare LF forwarded");
    let headers = &*req.headers;
    let named = |n: &'static str| headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(n));
    let lengths: Vec<_> = named("content-length").collect();
    let te: Vec<_> = named("transfer-encoding").collect();
    assert!(lengths.is_empty() || te.is_empty(), "both framings forwarded");
    assert!(lengths.len() <= 1 && te.len() <= 1, "framing field twice");
    assert!(named("host").count() <= 1, "Host twice");
    for h in req.headers.iter() {
        assert!(!h.name.contains('_'), "underscore name forwarded: {}", h.name);
        assert!(
            !["keep-alive", "proxy-connection", "te", "trailer", "expect"]
                .iter()
                .any(|x| h.name.eq_ignore_ascii_case(x)),
            "hop-by-hop forwarded: {}",
            h.name
        );
    }
    if let Some(l) = lengths.first() {
        assert!(l.value.iter().all(u8::is_ascii_digit) && !l.value.is_empty(), "length not canonical");
        let n: u64 = std::str::from_utf8(l.value).unwrap().parse().unwrap();
        return BodyFraming::Length(n);
    }
    if let Some(t) = te.first() {
        assert_eq!(t.value, b"chunked", "only chunked goes upstream");
        return BodyFraming::Chunked;
    }
    BodyFraming::None
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn accepted_requests_go_upstream_canonical(head in request_head()) {
        let mut out = Vec::new();
        if let Ok(Some(req)) = request::parse(&head, &opts(), &mut out) {
            rewrite::finish_head(&mut out, req.body.upstream());
            prop_assert_eq!(req.head_size, head.len());
            let seen = strict_framing(&out);
            prop_assert_eq!(seen, req.body);
            // Whatever length was accepted, the client's own field said exactly that in digits
            // around SP/HTAB: a reader that trims other bytes cannot disagree.
            if let BodyFraming::Length(n) = req.body {
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let digits = n.to_string();
                prop_assert!(text.contains(&digits));
            }
        }
    }

    #[test]
    fn split_heads_parse_the_same(head in request_head(), cut in 0usize..200) {
        let mut whole = Vec::new();
        let full = request::parse(&head, &opts(), &mut whole).map(|r| r.map(|r| r.head_size));
        let cut = cut.min(head.len());
        let mut part = Vec::new();
        if cut < head.len() {
            // A prefix is incomplete or already refused, never accepted as something else.
            if let Ok(Some(r)) = request::parse(&head[..cut], &opts(), &mut part) {
                prop_assert!(false, "prefix accepted as a head of {}", r.head_size);
            }
        }
        let again = request::parse(&head, &opts(), &mut part).map(|r| r.map(|r| r.head_size));
        prop_assert_eq!(full, again);
    }

    #[test]
    fn chunked_round_trip(pieces in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8),
                          feed in 1usize..64) {
        let mut wire = Vec::new();
        for p in &pieces {
            chunked::encode(p, &mut wire);
        }
        wire.extend_from_slice(chunked::LAST_CHUNK);
        wire.extend_from_slice(b"NEXT");
        // Fed in small reads, as from a socket.
        let mut buf = BytesMut::new();
        let mut state = Chunk::Size;
        let mut body = Vec::new();
        let mut input = wire.chunks(feed);
        let mut ended = false;
        while !ended {
            match chunked::decode(&mut state, &mut buf).unwrap() {
                Step::Data(d) => body.extend_from_slice(&d),
                Step::Advanced => {}
                Step::End => ended = true,
                Step::NeedMore => match input.next() {
                    Some(more) => buf.extend_from_slice(more),
                    None => break,
                },
            }
        }
        prop_assert!(ended);
        prop_assert_eq!(body, pieces.concat());
        let rest: Vec<u8> = buf.iter().copied().chain(input.flatten().copied()).collect();
        prop_assert_eq!(rest, b"NEXT".to_vec());
    }

    #[test]
    fn chunked_garbage_never_panics(raw in prop::collection::vec(
        prop::sample::select(vec![b'0', b'5', b'a', b'f', b'g', b';', b' ', b'\t', b'\r', b'\n', b'x', 0u8, 0xc2]),
        0..64))
    {
        let mut buf = BytesMut::from(&raw[..]);
        let mut state = Chunk::Size;
        for _ in 0..128 {
            match chunked::decode(&mut state, &mut buf) {
                Ok(Step::End | Step::NeedMore) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    #[test]
    fn accepted_responses_go_to_the_client_canonical(
        fields in prop::collection::vec((prop::sample::select(vec![
            &b"Content-Length"[..], b"Transfer-Encoding", b"Connection", b"X-A"]), pad(),
            prop::sample::select(vec![&b"5"[..], b"chunked", b"gzip", b"chunked, gzip", b"gzip, chunked", b"close", b"x-a"]),
        ), 0..5),
        head_request in any::<bool>(),
        http11 in any::<bool>(),
    ) {
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        for (n, p, v) in &fields {
            raw.extend_from_slice(&[n, &b": "[..], p, v, b"\r\n"].concat());
        }
        raw.extend_from_slice(b"\r\n");
        let mut buf = BytesMut::from(&raw[..]);
        if let Ok(Some(head)) = response::parse(&mut buf, head_request) {
            let mut out = Vec::new();
            let framing = head.write_h1(&mut out, None, http11, head_request, false);
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut slots);
            prop_assert!(matches!(resp.parse(&out), Ok(httparse::Status::Complete(_))));
            let named = |n: &str| resp.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(n)).count();
            prop_assert!(named("content-length") <= 1 && named("transfer-encoding") <= 1);
            prop_assert!(named("content-length") == 0 || named("transfer-encoding") == 0);
            if let Some(te) = resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case("transfer-encoding")) {
                let chunked = te.value.windows(7).filter(|w| w.eq_ignore_ascii_case(b"chunked")).count();
                prop_assert_eq!(chunked, 1);
                prop_assert!(te.value.ends_with(b"chunked"));
                prop_assert_eq!(framing, ClientFraming::Chunk);
            }
        }
    }
}

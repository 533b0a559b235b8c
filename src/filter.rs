//! Request filters: which requests belong to an environment.
//!
//! `FilterSpec` is the stored, serialisable form; `Filter` is the compiled
//! form the data plane matches with. The default filter matches the W3C
//! `baggage` member `preview-key=<key>` or the `x-preview-key` header.

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

/// The baggage member that carries the environment key.
pub const BAGGAGE_MEMBER: &str = "preview-key";
/// A plain header that carries the key, for clients that cannot set baggage.
pub const KEY_HEADER: &str = "x-preview-key";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterSpec {
    /// Regex over `Name: Value`, case-insensitive; any header may match.
    Header(String),
    /// Regex over the path, and over path+query.
    Path(String),
    /// HTTP method, case-insensitive.
    Method(String),
    AllOf(Vec<FilterSpec>),
    AnyOf(Vec<FilterSpec>),
    /// The default: baggage `preview-key=<key>` or `x-preview-key: <key>`.
    Key(String),
}

/// A compiled filter.
#[derive(Debug, Clone)]
pub enum Filter {
    Header(Regex),
    Path(Regex),
    Method(String),
    AllOf(Vec<Filter>),
    AnyOf(Vec<Filter>),
    Key(String),
}

impl FilterSpec {
    /// Compiles every regex; the error says which one failed.
    pub fn compile(&self) -> Result<Filter, String> {
        let re = |what: &str, s: &str| {
            RegexBuilder::new(s)
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("{what} regex {s:?} does not compile: {e}"))
        };
        Ok(match self {
            FilterSpec::Header(s) => Filter::Header(re("header", s)?),
            FilterSpec::Path(s) => Filter::Path(re("path", s)?),
            FilterSpec::Method(m) => {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(format!("method {m:?} is not an HTTP method"));
                }
                Filter::Method(m.to_ascii_uppercase())
            }
            FilterSpec::AllOf(v) => Filter::AllOf(v.iter().map(FilterSpec::compile).collect::<Result<_, _>>()?),
            FilterSpec::AnyOf(v) => Filter::AnyOf(v.iter().map(FilterSpec::compile).collect::<Result<_, _>>()?),
            FilterSpec::Key(k) => Filter::Key(k.clone()),
        })
    }
}

impl FilterSpec {
    /// Every regex in the filter (header and path filters, nested ones too).
    pub fn regexes(&self) -> Vec<&str> {
        match self {
            FilterSpec::Header(s) | FilterSpec::Path(s) => vec![s.as_str()],
            FilterSpec::Method(_) | FilterSpec::Key(_) => Vec::new(),
            FilterSpec::AllOf(v) | FilterSpec::AnyOf(v) => v.iter().flat_map(FilterSpec::regexes).collect(),
        }
    }
}

/// What a filter looks at in a request. Implemented for `http::request::Parts`
/// and anything else that can list its headers.
pub trait RequestView {
    fn method(&self) -> &str;
    /// Path with query, as on the request line.
    fn path_and_query(&self) -> &str;
    fn for_each_header(&self, f: &mut dyn FnMut(&str, &[u8]) -> bool) -> bool;
}

impl RequestView for http::request::Parts {
    fn method(&self) -> &str {
        self.method.as_str()
    }
    fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map_or("/", |p| p.as_str())
    }
    fn for_each_header(&self, f: &mut dyn FnMut(&str, &[u8]) -> bool) -> bool {
        self.headers.iter().any(|(n, v)| f(n.as_str(), v.as_bytes()))
    }
}

impl<B> RequestView for http::Request<B> {
    fn method(&self) -> &str {
        self.method().as_str()
    }
    fn path_and_query(&self) -> &str {
        self.uri().path_and_query().map_or("/", |p| p.as_str())
    }
    fn for_each_header(&self, f: &mut dyn FnMut(&str, &[u8]) -> bool) -> bool {
        self.headers().iter().any(|(n, v)| f(n.as_str(), v.as_bytes()))
    }
}

impl Filter {
    pub fn matches(&self, req: &dyn RequestView) -> bool {
        match self {
            Filter::Method(m) => req.method().eq_ignore_ascii_case(m),
            Filter::Path(re) => {
                let pq = req.path_and_query();
                let path = pq.split('?').next().unwrap_or(pq);
                re.is_match(path) || (path.len() != pq.len() && re.is_match(pq))
            }
            Filter::Header(re) => {
                // One reused buffer: the regex needs `Name: Value` contiguous.
                let mut line = String::new();
                req.for_each_header(&mut |name, value| {
                    let Ok(value) = std::str::from_utf8(value) else { return false };
                    line.clear();
                    line.push_str(name);
                    line.push_str(": ");
                    line.push_str(value);
                    re.is_match(&line)
                })
            }
            Filter::AllOf(v) => v.iter().all(|f| f.matches(req)),
            Filter::AnyOf(v) => v.iter().any(|f| f.matches(req)),
            Filter::Key(key) => req.for_each_header(&mut |name, value| {
                if name.eq_ignore_ascii_case(KEY_HEADER) {
                    value.trim_ascii() == key.as_bytes()
                } else if name.eq_ignore_ascii_case("baggage") {
                    baggage_has_key(value, key)
                } else {
                    false
                }
            }),
        }
    }
}

/// The environment key a request carries: the first `x-preview-key` header
/// or `preview-key` baggage member, trimmed. `None` (and no allocation) for
/// a request that carries none.
pub fn request_key(req: &dyn RequestView) -> Option<String> {
    let mut found = None;
    req.for_each_header(&mut |name, value| {
        let v = if name.eq_ignore_ascii_case(KEY_HEADER) {
            Some(value.trim_ascii())
        } else if name.eq_ignore_ascii_case(BAGGAGE) {
            baggage_value(value).next()
        } else {
            None
        };
        // An empty value is no key: keep looking.
        found = v.filter(|v| !v.is_empty()).and_then(|v| std::str::from_utf8(v).ok()).map(str::to_string);
        found.is_some()
    });
    found
}

/// True when a W3C baggage header value has `preview-key=<key>` exactly.
/// Members are `,`-separated; each may carry `;`-separated properties.
pub fn baggage_has_key(header: &[u8], key: &str) -> bool {
    baggage_value(header).any(|v| v == key.as_bytes())
}

/// Adds `preview-key=<key>` to a request's baggage: a new header when there
/// is none, appended to the last one when no header has the member, and
/// nothing when any header already has it (whatever its value). Returns
/// whether it changed anything.
pub fn inject_baggage(headers: &mut http::HeaderMap, key: &str) -> bool {
    if headers.get_all(BAGGAGE).iter().any(|v| baggage_value(v.as_bytes()).next().is_some()) {
        return false;
    }
    let member = format!("{BAGGAGE_MEMBER}={key}");
    match headers.entry(BAGGAGE) {
        http::header::Entry::Vacant(e) => match http::HeaderValue::from_str(&member) {
            Ok(v) => {
                e.insert(v);
                true
            }
            Err(_) => false,
        },
        http::header::Entry::Occupied(mut e) => {
            let Some(last) = e.iter_mut().last() else { return false };
            let old = last.as_bytes().trim_ascii();
            let joined = if old.is_empty() { member.into_bytes() } else { [old, b",", member.as_bytes()].concat() };
            match http::HeaderValue::from_bytes(&joined) {
                Ok(v) => {
                    *last = v;
                    true
                }
                Err(_) => false,
            }
        }
    }
}

/// Sets the request's key to `key`, whatever it carried: every other
/// `preview-key` baggage member and every `x-preview-key` header go, other
/// baggage members stay. The share gateway's way: a link opens its own
/// environment only, never one whose key the visitor names.
pub fn set_baggage_key(headers: &mut http::HeaderMap, key: &str) {
    headers.remove(KEY_HEADER);
    let kept: Vec<http::HeaderValue> = headers
        .get_all(BAGGAGE)
        .iter()
        .filter_map(|v| {
            let members: Vec<&[u8]> = v
                .as_bytes()
                .split(|b| *b == b',')
                .filter(|m| {
                    let name = m.split(|b| *b == b'=').next().unwrap_or_default().trim_ascii();
                    !name.is_empty() && !name.eq_ignore_ascii_case(BAGGAGE_MEMBER.as_bytes())
                })
                .map(|m| m.trim_ascii())
                .collect();
            (!members.is_empty()).then(|| http::HeaderValue::from_bytes(&members.join(&b","[..])).ok()).flatten()
        })
        .collect();
    headers.remove(BAGGAGE);
    for v in kept {
        headers.append(BAGGAGE, v);
    }
    inject_baggage(headers, key);
}

const BAGGAGE: &str = "baggage";

/// Every value of the `preview-key` member in one baggage header.
pub fn baggage_value(header: &[u8]) -> impl Iterator<Item = &[u8]> {
    header.split(|b| *b == b',').filter_map(|member| {
        let kv = member.split(|b| *b == b';').next()?;
        let eq = kv.iter().position(|b| *b == b'=')?;
        let (name, value) = (kv[..eq].trim_ascii(), kv[eq + 1..].trim_ascii());
        (name == BAGGAGE_MEMBER.as_bytes()).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).expect("valid test request").into_parts().0
    }

    #[test]
    fn the_gateway_key_replaces_any_other() {
        let mut h = http::HeaderMap::new();
        h.append("baggage", "userId=7, preview-key=other;p=1".parse().unwrap());
        h.append("baggage", "preview-key=third".parse().unwrap());
        h.insert(KEY_HEADER, "other".parse().unwrap());
        set_baggage_key(&mut h, "k");
        let all: Vec<&str> = h.get_all("baggage").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(all, vec!["userId=7,preview-key=k"]);
        assert!(h.get(KEY_HEADER).is_none());
        let mut empty = http::HeaderMap::new();
        set_baggage_key(&mut empty, "k");
        assert_eq!(empty.get("baggage").unwrap(), "preview-key=k");
    }

    #[test]
    fn baggage_injection_never_duplicates() {
        let run = |given: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in given {
                h.append("baggage", v.parse().unwrap());
            }
            let changed = inject_baggage(&mut h, "k1");
            (changed, h.get_all("baggage").iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>())
        };
        assert_eq!(run(&[]), (true, vec!["preview-key=k1".to_string()]));
        assert_eq!(run(&["a=1"]), (true, vec!["a=1,preview-key=k1".to_string()]));
        assert_eq!(run(&["a=1", "b=2"]), (true, vec!["a=1".to_string(), "b=2,preview-key=k1".to_string()]));
        assert_eq!(run(&[""]), (true, vec!["preview-key=k1".to_string()]));
        // Already there (even with another key): untouched.
        assert_eq!(run(&["a=1, preview-key=k1"]), (false, vec!["a=1, preview-key=k1".to_string()]));
        assert!(!run(&["preview-key=other", "a=1"]).0);
        // Injecting twice is the same as once.
        let mut h = http::HeaderMap::new();
        assert!(inject_baggage(&mut h, "k1"));
        assert!(!inject_baggage(&mut h, "k1"));
        assert_eq!(h.get_all("baggage").iter().count(), 1);
    }

    #[test]
    fn key_filter_is_exact() {
        let f = FilterSpec::Key("abc".into()).compile().unwrap();
        let yes = [
            vec![("baggage", "preview-key=abc")],
            vec![("baggage", "a=1, preview-key = abc ;prop=2, b=3")],
            vec![("baggage", "a=1"), ("baggage", "preview-key=abc")],
            vec![("X-Preview-Key", "abc")],
            vec![("Baggage", "preview-key=abc")],
        ];
        for h in yes {
            assert!(f.matches(&req("GET", "/", &h)), "{h:?}");
        }
        let no = [
            vec![("baggage", "preview-key=abc-1")],
            vec![("baggage", "preview-key=ab")],
            vec![("baggage", "xpreview-key=abc")],
            vec![("baggage", "other=preview-key=abc")],
            vec![("x-preview-key", "abcd")],
            vec![],
        ];
        for h in no {
            assert!(!f.matches(&req("GET", "/", &h)), "{h:?}");
        }
    }

    #[test]
    fn regex_filters() {
        let h = FilterSpec::Header("^x-user: alice$".into()).compile().unwrap();
        assert!(h.matches(&req("GET", "/", &[("X-User", "Alice")])));
        assert!(!h.matches(&req("GET", "/", &[("x-user", "bob")])));
        let p = FilterSpec::Path("^/api/".into()).compile().unwrap();
        assert!(p.matches(&req("GET", "/api/x?q=1", &[])));
        assert!(!p.matches(&req("GET", "/health", &[])));
        let q = FilterSpec::Path("q=1$".into()).compile().unwrap();
        assert!(q.matches(&req("GET", "/x?q=1", &[])));
        let all = FilterSpec::AllOf(vec![FilterSpec::Method("post".into()), FilterSpec::Path("^/a".into())])
            .compile()
            .unwrap();
        assert!(all.matches(&req("POST", "/a", &[])));
        assert!(!all.matches(&req("GET", "/a", &[])));
        let any = FilterSpec::AnyOf(vec![FilterSpec::Method("PUT".into()), FilterSpec::Path("^/a".into())])
            .compile()
            .unwrap();
        assert!(any.matches(&req("GET", "/a", &[])));
        assert!(any.matches(&req("PUT", "/b", &[])));
        assert!(!any.matches(&req("GET", "/b", &[])));
        assert!(FilterSpec::Header("(".into()).compile().is_err());
        assert!(FilterSpec::Method("G T".into()).compile().is_err());
    }

    /// Fuzz-style property test over filter matching: random header values
    /// and baggage never panic, and the key filter agrees with a simple model.
    #[test]
    fn random_headers_never_panic_and_match_the_model() {
        let mut next = crate::xorshift(0x9E37_79B9_7F4A_7C15);
        let alphabet = b"ab-=,; preview-key\t\x7f\xff";
        let filters: Vec<Filter> = [
            FilterSpec::Key("ab".into()),
            FilterSpec::Header("^baggage: .*preview-key=ab".into()),
            FilterSpec::AnyOf(vec![FilterSpec::Path("^/a".into()), FilterSpec::Method("POST".into())]),
        ]
        .iter()
        .map(|f| f.compile().unwrap())
        .collect();
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let value: Vec<u8> = (0..len).map(|_| alphabet[(next() as usize) % alphabet.len()]).collect();
            // The model: split on ',', take the part before ';', trim, compare.
            let model = value.split(|b| *b == b',').any(|m| {
                let kv = m.split(|b| *b == b';').next().unwrap_or_default();
                kv.iter()
                    .position(|b| *b == b'=')
                    .is_some_and(|eq| kv[..eq].trim_ascii() == b"preview-key" && kv[eq + 1..].trim_ascii() == b"ab")
            });
            assert_eq!(baggage_has_key(&value, "ab"), model, "{:?}", String::from_utf8_lossy(&value));
            let Ok(hv) = http::HeaderValue::from_bytes(&value) else { continue };
            let mut req = http::Request::get("/a?x").body(()).unwrap();
            req.headers_mut().insert("baggage", hv);
            for f in &filters {
                let _ = f.matches(&req);
            }
        }
    }
}

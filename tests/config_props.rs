//! Issue 14, bad input: a property test of Start's request checks
//! (`config::read_start`: the mirrord-shaped config in JSON or YAML, the key
//! and the TTL) over 10 000 generated requests. Half are valid by
//! construction and must be read back as generated; the other half are those
//! mutated (a leaf replaced by a value of another type, an unknown field, a
//! field dropped, bytes of the text flipped) and must be either accepted or
//! refused with an error that names a field. Nothing may panic. Pure logic:
//! no cluster.

use preview::config::{MAX_REPLICAS, read_start};
use preview::model::{Mode, PodRequest, StartRequest, Target};
use serde_json::{Value, json};

/// xorshift64*: deterministic, so a failure names the seed that found it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn name(&mut self) -> String {
        let len = 1 + self.below(12) as usize;
        (0..len)
            .map(|i| *self.pick(if i == 0 { b"abcxyz" } else { b"abcxyz0129-" }) as char)
            .collect::<String>()
            .trim_end_matches('-')
            .to_string()
    }
}

/// What a valid config was generated with, to compare with what is read.
struct Expect {
    target: Option<String>,
    mode: Mode,
    ports: Vec<u16>,
    replicas: u32,
    propagate_key: bool,
    ttl_secs: Option<u64>,
}

/// An `http_filter` (top level: `header_filter`…, `all_of`, `any_of`) or,
/// inside `all_of`/`any_of`, one of mirrord's inner filters (`header`…).
fn filter(r: &mut Rng, inner: bool) -> Value {
    let field = |f: &str| if inner { f.to_string() } else { format!("{f}_filter") };
    match r.below(if inner { 3 } else { 5 }) {
        0 => json!({field("header"): format!("^x-{}: .*", r.name())}),
        1 => json!({field("path"): format!("^/{}", r.name())}),
        2 => json!({field("method"): *r.pick(&["GET", "POST", "PUT"])}),
        n => {
            let items: Vec<Value> = (0..1 + r.below(3)).map(|_| filter(r, true)).collect();
            if n == 3 { json!({"all_of": items}) } else { json!({"any_of": items}) }
        }
    }
}

fn valid(r: &mut Rng) -> (Value, Expect) {
    let mut doc = serde_json::Map::new();
    let target = r.chance(85).then(|| format!("{}/{}", r.pick(&["deployment", "statefulset", "pod"]), r.name()));
    if let Some(t) = &target {
        doc.insert("target".into(), json!(t));
    }
    let mode = if r.chance(50) { Mode::Steal } else { Mode::Mirror };
    let mut incoming = serde_json::Map::new();
    incoming.insert("mode".into(), json!(if mode == Mode::Steal { "steal" } else { "mirror" }));
    let ports: Vec<u16> = (0..r.below(4)).map(|_| 1 + r.below(65535) as u16).collect();
    if !ports.is_empty() {
        incoming.insert("ports".into(), json!(ports));
    }
    if r.chance(50) {
        incoming.insert("http_filter".into(), filter(r, false));
    }
    let replicas = 1 + r.below(MAX_REPLICAS as u64) as u32;
    let propagate_key = r.chance(70);
    let ttl_secs = r.chance(50).then(|| 1 + r.below(100_000));
    let mut preview =
        json!({"replicas": replicas, "propagate_key": propagate_key, "image": format!("img/{}:v1", r.name())});
    if let Some(s) = ttl_secs {
        preview["ttl_secs"] = json!(s);
    }
    let env: serde_json::Map<String, Value> =
        (0..r.below(3)).map(|_| (r.name().to_uppercase().replace('-', "_"), json!(r.name()))).collect();
    doc.insert(
        "feature".into(),
        json!({"network": {"incoming": incoming}, "env": {"override": env}, "preview": preview}),
    );
    if r.chance(30) {
        // A mirrord field previewd accepts and ignores (with a warning).
        doc.insert("agent".into(), json!({"ttl": 30}));
    }
    (Value::Object(doc), Expect { target, mode, ports, replicas, propagate_key, ttl_secs })
}

/// Every leaf path of a JSON value.
fn paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(o) => o.iter().for_each(|(k, v)| {
            at.push(k.clone());
            out.push(at.clone());
            paths(v, at, out);
            at.pop();
        }),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| {
            at.push(i.to_string());
            out.push(at.clone());
            paths(v, at, out);
            at.pop();
        }),
        _ => {}
    }
}

fn slot<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, p| match v {
        Value::Object(o) => o.get_mut(p),
        Value::Array(a) => a.get_mut(p.parse::<usize>().ok()?),
        _ => None,
    })
}

fn odd_value(r: &mut Rng) -> Value {
    match r.below(9) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(u64::MAX),
        4 => json!(1.5),
        5 => json!("(["),
        6 => json!("x".repeat(300)),
        7 => json!([1, "a", null]),
        _ => json!({"deployment": "UPPER", "nested": {"all_of": []}}),
    }
}

fn mutate(r: &mut Rng, mut doc: Value) -> Value {
    for _ in 0..1 + r.below(3) {
        let mut all = Vec::new();
        paths(&doc, &mut Vec::new(), &mut all);
        let Some(path) = (!all.is_empty()).then(|| r.pick(&all).clone()) else { break };
        match r.below(3) {
            0 => {
                if let Some(s) = slot(&mut doc, &path) {
                    *s = odd_value(r);
                }
            }
            1 => {
                if let Some(Value::Object(o)) = slot(&mut doc, &path[..path.len() - 1]) {
                    // Sometimes a field with an empty name (the fuzzer found its error named nothing).
                    let name = if r.chance(10) { String::new() } else { format!("unknown_{}", r.name()) };
                    o.insert(name, odd_value(r));
                }
            }
            _ => {
                if let Some(Value::Object(o)) = slot(&mut doc, &path[..path.len() - 1]) {
                    o.remove(&path[path.len() - 1]);
                }
            }
        }
    }
    doc
}

fn render(r: &mut Rng, doc: &Value) -> String {
    if r.chance(50) { doc.to_string() } else { serde_yaml::to_string(doc).expect("a JSON value is valid YAML") }
}

fn flip_bytes(r: &mut Rng, text: &str) -> String {
    let mut b = text.as_bytes().to_vec();
    for _ in 0..1 + r.below(4) {
        if b.is_empty() {
            break;
        }
        let i = r.below(b.len() as u64) as usize;
        b[i] = *r.pick(b"{}[]:,\"'-\n \t#&*!|>0a");
    }
    String::from_utf8_lossy(&b).into_owned()
}

const FIELD_ROOTS: [&str; 6] = ["config", "key", "target", "feature", "ttl", "pods"];

#[test]
fn ten_thousand_generated_requests_are_read_or_refused_by_field() {
    const N: usize = 10_000;
    let seed = 0x5eed_1234_abcd_0001;
    let mut r = Rng(seed);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..N {
        let (doc, expect) = valid(&mut r);
        let key = r.chance(50).then(|| format!("k{}", r.below(1 << 30)));
        let mutated = i % 2 == 1;
        let text = if !mutated {
            render(&mut r, &doc)
        } else if r.chance(70) {
            let m = mutate(&mut r, doc);
            render(&mut r, &m)
        } else {
            let t = render(&mut r, &doc);
            flip_bytes(&mut r, &t)
        };
        let ttl = if mutated && r.chance(20) {
            (*r.pick(&["0s", "1h", "forever", "99999999999999h", ""])).into()
        } else {
            String::new()
        };
        let req = StartRequest {
            pods: vec![PodRequest { config: text.clone(), ..Default::default() }],
            key: key.clone().unwrap_or_default(),
            ttl,
        };
        match (read_start(&req), mutated) {
            (Ok(read), false) => {
                accepted += 1;
                let c = &read.configs[0];
                let target = match &c.target {
                    Target::Targetless => None,
                    Target::Workload { kind, name, .. } => Some(format!("{}/{name}", kind.as_str())),
                };
                let got = (target, c.mode, c.ports.clone(), c.replicas, c.propagate_key);
                let want = (expect.target, expect.mode, expect.ports, expect.replicas, expect.propagate_key);
                assert_eq!(got, want, "seed {seed:#x}, request {i}: read back differently:\n{text}");
                assert_eq!(
                    c.ttl.map(|t| t.to_string()),
                    expect
                        .ttl_secs
                        .map(|s| { preview::model::Ttl::parse("t", &format!("{s}s")).expect("positive").to_string() })
                );
                if let Some(k) = &key {
                    assert_eq!(read.key.as_str(), k.as_str());
                }
            }
            (Err(e), false) => panic!("seed {seed:#x}, request {i}: a valid config was refused: {e}\n{text}"),
            (Ok(_), true) => accepted += 1,
            (Err(e), true) => {
                refused += 1;
                let root = e.field.split(['.', '[']).next().unwrap_or_default();
                // A known field, or the unknown one the input carries.
                let named = FIELD_ROOTS.contains(&root) || (!root.is_empty() && text.contains(root));
                assert!(
                    named && !e.message.is_empty(),
                    "seed {seed:#x}, request {i}: the error names no field: {e:?}\n{text}"
                );
            }
        }
    }
    eprintln!("{N} requests: {accepted} accepted, {refused} refused with a field named");
    // The mutations must reach the checks, not just the parser's happy path.
    assert!(refused > N / 10, "only {refused} of {N} refused: the generator barely mutates");
}

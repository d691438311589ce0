use super::*;
use crate::geo::GeoCatalog;
use crate::rules::parse;

/// A picker over nodes 0..n, some of them down, that records what it was asked.
struct Picker {
    n: u32,
    down: Vec<NodeIdx>,
    next: u32,
    asked_avoid: Vec<Option<NodeIdx>>,
}

impl Picker {
    fn new(n: u32) -> Self {
        Picker {
            n,
            down: vec![],
            next: 0,
            asked_avoid: vec![],
        }
    }
}

impl NodePicker for Picker {
    fn pick(&mut self, avoid: Option<NodeIdx>) -> Result<NodeIdx, Rejection> {
        self.asked_avoid.push(avoid);
        for _ in 0..self.n {
            let i = self.next % self.n;
            self.next += 1;
            if Some(i) != avoid && !self.down.contains(&i) {
                return Ok(i);
            }
        }
        Err(Rejection::new(Code::NodeNotFound, "none"))
    }
    fn usable(&self, node: NodeIdx) -> bool {
        !self.down.contains(&node)
    }
}

fn rules(u: &str) -> Rules {
    parse(u, &GeoCatalog::new()).unwrap()
}

fn key(r: &Rules) -> SessionKey {
    SessionKey {
        package: r.package,
        id: r.session.unwrap(),
    }
}

#[test]
fn a_session_keeps_its_node_until_it_expires() {
    let t = SessionTable::new(1000);
    let mut p = Picker::new(5);
    let r = rules("package-7-country-any-session-abc-sessionlength-60");
    let t0 = Now::from_secs(1000);
    let first = t.acquire(key(&r), &r, t0, &mut p).unwrap().node;
    for s in 1..60 {
        let l = t
            .acquire(key(&r), &r, Now::from_secs(1000 + s), &mut p)
            .unwrap();
        assert_eq!(l.node, first, "second {s}");
    }
    assert_eq!(t.get(&key(&r), Now::from_secs(1059)).unwrap().requests, 60);
    // Expired: a new period on a new node; the old is avoided.
    let next = t
        .acquire(key(&r), &r, Now::from_secs(1060), &mut p)
        .unwrap()
        .node;
    assert_ne!(next, first);
    assert_eq!(p.asked_avoid.last(), Some(&Some(first)));
    assert_eq!(t.get(&key(&r), Now::from_secs(1060)).unwrap().requests, 1);
    // Another package's session with the same id is another session.
    let other = rules("package-8-country-any-session-abc");
    t.acquire(key(&other), &other, Now::from_secs(1060), &mut p)
        .unwrap();
    assert_eq!(t.list(Some(7), Now::from_secs(1060)).len(), 1);
    assert_eq!(t.list(None, Now::from_secs(1060)).len(), 2);
    assert!(t.remove(&key(&other)));
    assert_eq!(t.sweep(Now::from_secs(1060)), 1);
    assert_eq!(t.sweep(Now::from_secs(5000)), 0);
}

#[test]
fn different_rules_mismatch_but_sessionlength_may_differ() {
    let t = SessionTable::new(1000);
    let mut p = Picker::new(5);
    let a = rules("package-7-country-us-session-s1-sessionlength-100");
    let b = rules("package-7-country-gb-session-s1");
    let c = rules("package-7-country-us-session-s1-sessionlength-5");
    let t0 = Now::from_secs(10);
    t.acquire(key(&a), &a, t0, &mut p).unwrap();
    let e = t
        .acquire(key(&b), &b, Now::from_secs(50), &mut p)
        .unwrap_err();
    assert_eq!(e.code, Code::SessionParamsMismatch);
    assert!(
        e.detail.contains("session s1") && e.detail.contains("60 s"),
        "{}",
        e.detail
    );
    assert!(t.acquire(key(&c), &c, Now::from_secs(50), &mut p).is_ok());
    // After the session ends, new rules start a new session.
    assert!(t.acquire(key(&b), &b, Now::from_secs(111), &mut p).is_ok());
}

#[test]
fn rotation_by_time_and_by_requests() {
    let t = SessionTable::new(1000);
    let mut p = Picker::new(3);
    let r = rules("package-7-country-any-session-r-rotate-requests_3");
    let nodes: Vec<_> = (0..9)
        .map(|i| {
            t.acquire(key(&r), &r, Now::from_secs(i), &mut p)
                .unwrap()
                .node
        })
        .collect();
    assert_eq!(&nodes[0..3], &[nodes[0]; 3]);
    assert_eq!(&nodes[3..6], &[nodes[3]; 3]);
    assert_ne!(nodes[0], nodes[3]);
    assert_ne!(nodes[3], nodes[6]);
    let r = rules("package-7-country-any-session-t-rotate-timed_10");
    let a = t
        .acquire(key(&r), &r, Now::from_secs(100), &mut p)
        .unwrap()
        .node;
    assert_eq!(
        t.acquire(key(&r), &r, Now::from_secs(109), &mut p)
            .unwrap()
            .node,
        a
    );
    let b = t
        .acquire(key(&r), &r, Now::from_secs(110), &mut p)
        .unwrap()
        .node;
    assert_ne!(a, b);
    assert_eq!(
        t.acquire(key(&r), &r, Now::from_secs(119), &mut p)
            .unwrap()
            .node,
        b
    );
}

#[test]
fn a_full_table_is_overloaded_until_sessions_expire() {
    let t = SessionTable::new(64); // one per shard
    let mut p = Picker::new(2);
    let mut full = 0;
    for i in 0..400 {
        let r = rules(&format!(
            "package-7-country-any-session-s{i}-sessionlength-10"
        ));
        if let Err(e) = t.acquire(key(&r), &r, Now::from_secs(0), &mut p) {
            assert_eq!(e.code, Code::Overloaded);
            full += 1;
        }
    }
    // At most one live session per shard (64) is admitted; the rest are refused.
    assert!((400 - 64..400).contains(&full), "{full}");
    assert!(t.sweep(Now::from_secs(0)) <= 64);
    let r = rules("package-7-country-any-session-late");
    assert!(
        t.acquire(key(&r), &r, Now::from_secs(11), &mut p).is_ok(),
        "expired ones make room"
    );
}

#[test]
fn a_down_node_is_reported_and_rebind_moves_the_session() {
    let t = SessionTable::new(100);
    let mut p = Picker::new(3);
    let r = rules("package-7-country-any-session-x");
    let l = t.acquire(key(&r), &r, Now::from_secs(0), &mut p).unwrap();
    p.down.push(l.node);
    let l2 = t.acquire(key(&r), &r, Now::from_secs(1), &mut p).unwrap();
    assert_eq!(
        l2,
        Lease {
            node: l.node,
            node_down: true,
            away: None
        }
    );
    t.rebind(key(&r), l.node, 2, Now::from_secs(1));
    assert_eq!(
        t.acquire(key(&r), &r, Now::from_secs(2), &mut p)
            .unwrap()
            .node,
        2
    );
    t.rebind(key(&r), 99, 1, Now::from_secs(2));
    assert_eq!(
        t.get(&key(&r), Now::from_secs(2)).unwrap().node,
        2,
        "a stale rebind is ignored"
    );
}

/// Drive the machine: `fails` = how many dials fail in a row; returns the
/// dials made and the final answer (None = the last dial succeeded).
fn drive(u: &str, fails: usize, candidates: u32) -> (Vec<NodeIdx>, Option<Code>) {
    let r = rules(u);
    let mut a = Attempts::new(0, &r);
    let mut dials = vec![0];
    let mut replace = |tried: &[NodeIdx]| {
        (0..candidates)
            .find(|i| !tried.contains(i))
            .ok_or_else(|| Rejection::new(Code::NodeNotFound, "no other"))
    };
    for _ in 0..fails {
        match a.on_failure(true, "n", &mut replace) {
            Step::Dial(n) => dials.push(n),
            Step::Fail(e) => return (dials, Some(e.code)),
        }
    }
    (dials, None)
}

/// The nodes tried and the final code.
type Driven = (Vec<NodeIdx>, Option<Code>);

/// The onerror machine, driven: rules, how many attempts fail, how many
/// nodes match; the nodes tried and the final code (`None`: established).
#[test]
fn onerror_table() {
    use Code::*;
    let any = "package-1-country-any";
    let bound = "package-1-country-any-session-s-bind-node";
    #[rustfmt::skip]
    let cases: Vec<(String, usize, u32, Driven)> = vec![
        // replace (the default): two more nodes after the first
        (any.into(), 1, 10, (vec![0, 1], None)),
        (any.into(), 3, 10, (vec![0, 1, 2], Some(NodeUnavailable))),
        (format!("{any}-session-s"), 3, 10, (vec![0, 1, 2], Some(NodeUnavailable))),
        (format!("{any}-session-s"), 1, 1, (vec![0], Some(NodeNotFound))),
        (format!("{any}-session-s-prefer-lookalike"), 2, 10, (vec![0, 1, 2], None)),
        // fail: answers at once
        (format!("{any}-onerror-fail"), 1, 10, (vec![0], Some(NodeUnavailable))),
        (format!("{any}-session-s-onerror-fail"), 1, 10, (vec![0], Some(NodeUnavailable))),
        // retry_N: the same node N more times, then one replacement
        (format!("{any}-onerror-retry_2"), 2, 10, (vec![0, 0, 0], None)),
        (format!("{any}-onerror-retry_2"), 3, 10, (vec![0, 0, 0, 1], None)),
        (format!("{any}-session-s-onerror-retry_2"), 4, 10, (vec![0, 0, 0, 1], Some(RetriesExhausted))),
        (format!("{any}-onerror-retry_1"), 2, 1, (vec![0, 0], Some(RetriesExhausted))),
        // bind-node: never replaced
        (bound.into(), 1, 10, (vec![0], Some(BoundNodeFailed))),
        (format!("{bound}-onerror-retry_3"), 4, 10, (vec![0, 0, 0, 0], Some(BoundNodeFailed))),
        (format!("{bound}-onerror-retry_3"), 3, 10, (vec![0, 0, 0, 0], None)),
    ];
    for (rules, fails, candidates, want) in cases {
        assert_eq!(
            drive(&rules, fails, candidates),
            want,
            "{rules}, {fails} failing, {candidates} nodes"
        );
    }
}

#[test]
fn an_offline_node_is_not_retried() {
    let r = rules("package-1-country-any-onerror-retry_3");
    let mut a = Attempts::new(0, &r);
    let mut replace = |_: &[NodeIdx]| Ok(5);
    assert_eq!(a.on_failure(false, "n", &mut replace), Step::Dial(5));
    assert_eq!(a.tried(), &[0, 5]);
    let b = rules("package-1-country-any-session-s-bind-node-onerror-retry_3");
    let mut a = Attempts::new(0, &b);
    match a.on_failure(false, "n", &mut replace) {
        Step::Fail(e) => assert_eq!(e.code, Code::BoundNodeFailed),
        s => panic!("{s:?}"),
    }
}

#[test]
fn retries_exhausted_counts_the_attempts_made() {
    let r = rules("package-1-country-any-onerror-retry_2");
    let mut a = Attempts::new(0, &r);
    let mut none = |_: &[NodeIdx]| Err(Rejection::new(Code::NodeNotFound, "no other"));
    assert_eq!(a.on_failure(true, "n", &mut none), Step::Dial(0));
    // The node goes offline: no more retries; two attempts were made, not three.
    match a.on_failure(false, "n", &mut none) {
        Step::Fail(e) => {
            assert_eq!(e.code, Code::RetriesExhausted);
            assert!(e.detail.contains("failed 2 times"), "{}", e.detail);
        }
        s => panic!("{s:?}"),
    }
}

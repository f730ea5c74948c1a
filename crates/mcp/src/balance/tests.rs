use super::*;
use crate::retry::ManualClock;
use proptest::prelude::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

fn cfg() -> BalancerConfig {
    BalancerConfig::default()
        .with_ejection(2, Duration::from_secs(30))
        .with_health_check(
            HealthCheckConfig::default()
                .with_timing(Duration::from_secs(5), Duration::from_secs(1))
                .with_thresholds(2, 2),
        )
}

fn three() -> Balancer<String> {
    Balancer::new(vec!["a".into(), "b".into(), "c".into()], cfg()).unwrap()
}

fn picks(b: &Balancer<String>, now: Instant, n: usize) -> String {
    (0..n).map(|_| b.pick(now).unwrap().1).collect()
}

#[test]
fn empty_list_is_an_error() {
    let err = Balancer::<String>::new(vec![], cfg()).unwrap_err();
    assert_eq!(err, BalanceError::NoEndpoints);
}

#[test]
fn round_robin_spreads_evenly() {
    let b = three();
    let t = Instant::now();
    assert_eq!(picks(&b, t, 7), "abcabca");
    assert_eq!(b.len(), 3);
    assert!(!b.is_empty());
    assert_eq!(b.endpoint(EndpointId(1)).map(String::as_str), Some("b"));
    assert_eq!(b.endpoints().len(), 3);
    let counts: Vec<u64> = b.status(t).iter().map(|s| s.picks).collect();
    assert_eq!(counts, [3, 2, 2]);
}

#[test]
fn passive_ejection_and_readmission_after_cooldown() {
    let b = three();
    let t0 = Instant::now();
    let b_id = EndpointId(1);
    b.report_failure(b_id, t0, "connection refused");
    assert_eq!(picks(&b, t0, 3), "abc", "one failure does not eject");
    b.report_failure(b_id, t0, "connection refused");
    assert_eq!(picks(&b, t0, 4), "acac");
    assert_eq!(
        b.status(t0)[1].state,
        EndpointState::Ejected {
            remaining: Duration::from_secs(30)
        }
    );
    // Cooldown over: back on probation.
    let t1 = t0 + Duration::from_secs(30);
    assert_eq!(b.status(t1)[1].state, EndpointState::Probation);
    assert!(picks(&b, t1, 3).contains('b'));
    // One more failure on probation ejects it again at once.
    b.report_failure(b_id, t1, "connection refused");
    assert!(!picks(&b, t1, 4).contains('b'));
    // A success (after the next cooldown) clears the streak.
    let t2 = t1 + Duration::from_secs(31);
    b.report_success(b_id);
    assert_eq!(b.status(t2)[1].state, EndpointState::Available);
    assert_eq!(b.status(t2)[1].failure_streak, 0);
}

#[test]
fn all_down_lists_every_endpoint() {
    let b = three();
    let t = Instant::now();
    for i in 0..3 {
        for _ in 0..2 {
            b.report_failure(EndpointId(i), t, "connection refused");
        }
    }
    let err = b.pick(t).unwrap_err();
    assert_eq!(
        err.to_string(),
        "all 3 endpoints are unavailable: a (ejected for 30 s more after 2 failures; last error: connection refused), \
         b (ejected for 30 s more after 2 failures; last error: connection refused), \
         c (ejected for 30 s more after 2 failures; last error: connection refused)"
    );
}

#[test]
fn active_checks_mark_unhealthy_and_healthy_with_thresholds() {
    let b = three();
    let t = Instant::now();
    b.record_probe(EndpointId(0), Err("down".into()));
    assert!(picks(&b, t, 3).contains('a'), "below the threshold");
    b.record_probe(EndpointId(0), Err("down".into()));
    assert_eq!(picks(&b, t, 4), "bcbc");
    assert_eq!(b.status(t)[0].state, EndpointState::Unhealthy);
    b.record_probe(EndpointId(0), Ok(()));
    assert!(
        !picks(&b, t, 4).contains('a'),
        "one good probe is not enough"
    );
    b.record_probe(EndpointId(0), Ok(()));
    assert!(picks(&b, t, 3).contains('a'));
}

#[test]
fn good_probes_readmit_an_ejected_endpoint_early() {
    let b = three();
    let t = Instant::now();
    b.report_failure(EndpointId(2), t, "reset");
    b.report_failure(EndpointId(2), t, "reset");
    assert!(!picks(&b, t, 3).contains('c'));
    b.record_probe(EndpointId(2), Ok(()));
    b.record_probe(EndpointId(2), Ok(()));
    assert!(picks(&b, t, 3).contains('c'));
    assert_eq!(b.status(t)[2].state, EndpointState::Available);
}

#[test]
fn session_fail_over_moves_to_another_endpoint() {
    let b = three();
    let t = Instant::now();
    let (first, _) = b.pick(t).unwrap();
    let (second, name) = b.fail_over(first, t, "session endpoint died").unwrap();
    assert_ne!(first, second);
    assert_eq!(name, "b");
    // The dead endpoint stays out for the cooldown.
    assert!(!picks(&b, t, 6).contains('a'));
    assert_eq!(
        b.status(t)[0].last_error.as_deref(),
        Some("session endpoint died")
    );
}

#[test]
fn fail_over_with_a_single_endpoint_reports_all_down() {
    let b = Balancer::new(vec!["only".to_owned()], cfg()).unwrap();
    let t = Instant::now();
    let (id, _) = b.pick(t).unwrap();
    let err = b.fail_over(id, t, "gone").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("all 1 endpoints are unavailable: only ("),
        "{err}"
    );
}

#[test]
fn pick_excluding_skips_and_explains() {
    let b = Balancer::new(vec!["x".to_owned(), "y".to_owned()], cfg()).unwrap();
    let t = Instant::now();
    assert!(b.any_available(t, &[EndpointId(0)]));
    assert!(!b.any_available(t, &[EndpointId(0), EndpointId(1)]));
    assert_eq!(b.status(t)[1].picks, 0, "any_available picks nothing");
    let (id, e) = b.pick_excluding(t, &[EndpointId(0)]).unwrap();
    assert_eq!((id, e.as_str()), (EndpointId(1), "y"));
    let err = b
        .pick_excluding(t, &[EndpointId(0), EndpointId(1)])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "all 2 endpoints are unavailable: x (just failed), y (just failed)"
    );
    // Unknown ids are ignored.
    b.report_failure(EndpointId(9), t, "x");
    b.report_success(EndpointId(9));
    b.record_probe(EndpointId(9), Ok(()));
}

#[test]
fn probe_all_records_results_and_times_out_hung_probes() {
    let b = three();
    let clock = ManualClock::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let probe = |e: String| async move {
        match e.as_str() {
            "a" => Ok(()),
            "b" => Err("HTTP 500".to_owned()),
            _ => {
                std::future::pending::<()>().await;
                Ok(())
            }
        }
    };
    for _ in 0..2 {
        rt.block_on(b.probe_all(&clock, &probe));
    }
    let t = clock.now();
    let st = b.status(t);
    assert_eq!(st[0].state, EndpointState::Available);
    assert_eq!(st[1].state, EndpointState::Unhealthy);
    assert_eq!(st[1].last_error.as_deref(), Some("HTTP 500"));
    assert_eq!(st[2].state, EndpointState::Unhealthy);
    assert_eq!(
        st[2].last_error.as_deref(),
        Some("health check timed out after 1s")
    );
    assert_eq!(picks(&b, t, 2), "aa");
}

#[test]
fn spawned_health_checks_run_until_dropped() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = BalancerConfig::default().with_health_check(
            HealthCheckConfig::default()
                .with_timing(Duration::from_millis(10), Duration::from_millis(50))
                .with_thresholds(1, 1),
        );
        let b = Arc::new(Balancer::new(vec!["a".to_owned(), "b".to_owned()], cfg).unwrap());
        let probes = Arc::new(AtomicUsize::new(0));
        let p2 = probes.clone();
        let handle = spawn_health_checks(
            b.clone(),
            Arc::new(crate::retry::TokioClock),
            move |e: String| {
                p2.fetch_add(1, Ordering::SeqCst);
                async move {
                    if e == "b" {
                        Err("down".to_owned())
                    } else {
                        Ok(())
                    }
                }
            },
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(handle);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let after_drop = probes.load(Ordering::SeqCst);
        assert!(after_drop >= 4, "{after_drop} probes");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(probes.load(Ordering::SeqCst), after_drop, "stopped on drop");
        assert_eq!(b.status(Instant::now())[1].state, EndpointState::Unhealthy);
    });
}

#[derive(Debug, Clone)]
enum Op {
    Pick,
    Fail(usize),
    Ok(usize),
    Probe(usize, bool),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Pick),
        2 => (0usize..4).prop_map(Op::Fail),
        1 => (0usize..4).prop_map(Op::Ok),
        2 => (0usize..4, any::<bool>()).prop_map(|(i, ok)| Op::Probe(i, ok)),
        1 => (0u64..40).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Whatever happens, a pick only returns an available endpoint, and when it fails no
    /// endpoint was available; a run of picks with no other event visits every available
    /// endpoint once before repeating any.
    #[test]
    fn picks_are_available_and_fair(ops in proptest::collection::vec(op(), 1..200)) {
        let b = Balancer::new((0..4).map(|i| i.to_string()).collect(), cfg()).unwrap();
        let mut t = Instant::now();
        for op in ops {
            match op {
                Op::Pick => {
                    let avail: HashSet<usize> = b.status(t).iter()
                        .filter(|s| matches!(s.state, EndpointState::Available | EndpointState::Probation))
                        .map(|s| s.id.0).collect();
                    prop_assert_eq!(b.any_available(t, &[]), !avail.is_empty());
                    match b.pick(t) {
                        Ok((id, _)) => prop_assert!(avail.contains(&id.0)),
                        Err(_) => prop_assert!(avail.is_empty()),
                    }
                    let round: Vec<usize> = (0..avail.len()).filter_map(|_| b.pick(t).ok()).map(|(i, _)| i.0).collect();
                    let distinct: HashSet<usize> = round.iter().copied().collect();
                    prop_assert_eq!(distinct, avail);
                }
                Op::Fail(i) => b.report_failure(EndpointId(i), t, "x"),
                Op::Ok(i) => b.report_success(EndpointId(i)),
                Op::Probe(i, ok) => b.record_probe(EndpointId(i), if ok { Ok(()) } else { Err("p".into()) }),
                Op::Advance(s) => t += Duration::from_secs(s),
            }
        }
    }
}

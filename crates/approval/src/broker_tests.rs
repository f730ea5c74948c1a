use super::*;

#[tokio::test]
async fn times_out_denied() {
    let b = Broker::new(BrokerConfig::default().with_timeout(Duration::from_millis(50)));
    let d = b
        .submit(Crossing::Egress {
            sandbox: "vm-1".into(),
            host: "example.com".into(),
            port: 443,
        })
        .await;
    assert_eq!(d, Decision::TimedOut);
}

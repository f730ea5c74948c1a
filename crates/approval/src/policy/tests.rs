use super::*;
use proptest::prelude::*;

fn p(text: &str) -> Policy {
    Policy::from_toml_str(text).unwrap_or_else(|e| panic!("{e}"))
}

fn err(text: &str) -> PolicyError {
    match Policy::from_toml_str(text) {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(e) => e,
    }
}

#[test]
fn first_match_wins() {
    let pol = p(r#"
default = "deny"

[[rule]]
action = "ask"
path = "/work/**/secret*"

[[rule]]
action = "allow"
path = "/work/**"

[[rule]]
action = "allow"
host = "*.PyPI.org"
"#);
    assert_eq!(
        pol.decide(&Subject::path("/work/a/secret.txt")),
        Action::Ask
    );
    assert_eq!(pol.decide(&Subject::path("/work/a/b.txt")), Action::Allow);
    assert_eq!(pol.decide(&Subject::path("/etc/passwd")), Action::Deny);
    assert_eq!(pol.decide(&Subject::host("FILES.pypi.org")), Action::Allow);
    assert_eq!(pol.decide(&Subject::host("pypi.org")), Action::Deny);
    // A subject without the rule's property does not match it.
    assert_eq!(pol.decide(&Subject::default()), Action::Deny);
    let r = pol.matching_rule(&Subject::path("/work/x")).unwrap();
    assert_eq!(r.line, 8);
    assert!(r.describe().contains("line 8"), "{}", r.describe());
}

#[test]
fn all_keys_of_a_rule_must_match() {
    let pol = p(r#"
default = "ask"
[[rule]]
action = "allow"
tool = "run"
command = "cargo *"
"#);
    let s = Subject::default()
        .with_tool("run")
        .with_command("cargo build");
    assert_eq!(pol.decide(&s), Action::Allow);
    assert_eq!(pol.decide(&s.clone().with_tool("exec")), Action::Ask);
    assert_eq!(
        pol.decide(&Subject::default().with_command("cargo build")),
        Action::Ask
    );
}

#[test]
fn refusals_name_line_and_reason() {
    let e = err("default = \"ask\"\n\n[[rule]]\naction = \"allow\"\npaht = \"/x\"\n");
    assert_eq!(e.line(), Some(5), "{e}");
    assert!(e.to_string().contains("paht"), "{e}");

    let e = err("default = \"maybe\"\n");
    assert_eq!(e.line(), Some(1), "{e}");
    assert!(
        e.to_string().contains("maybe") || e.to_string().contains("variant"),
        "{e}"
    );

    let e = err("[[rule]]\naction = \"allow\"\nhost = \"x\"\n");
    assert!(e.to_string().contains("no `default`"), "{e}");

    let e = err("default = \"ask\"\n[[rule]]\naction = \"allow\"\n");
    assert_eq!(e.line(), Some(2), "{e}");
    assert!(e.to_string().contains("matches nothing"), "{e}");

    let e = err("default = \"ask\"\n[[rule]]\nhost = \"x\"\n");
    assert!(e.to_string().contains("no `action`"), "{e}");

    let e = err("default = \"ask\"\n[[rule]]\naction = \"deny\"\n\npath = \"\"\n");
    assert_eq!(e.line(), Some(5), "{e}");
    assert!(e.to_string().contains("empty"), "{e}");

    let e = err("default = \"ask\"\nunknown = 1\n");
    assert_eq!(e.line(), Some(2), "{e}");

    let e = err("default = \"ask\"\n[[rule]]\naction = \"deny\"\npath = \"x\\\\\"\n");
    assert_eq!(e.line(), Some(4), "{e}");

    let e = err("default = \n");
    assert_eq!(e.line(), Some(1), "{e}");
    let long = format!(
        "default = \"ask\"\n[[rule]]\naction = \"deny\"\nhost = \"{}\"\n",
        "a".repeat(MAX_GLOB_LEN + 1)
    );
    assert!(err(&long).to_string().contains("longer"));
}

#[test]
fn load_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("policy.toml");
    std::fs::write(
        &f,
        "default = \"allow\"\n[[rule]]\naction = \"deny\"\nfoo = 1\n",
    )
    .unwrap();
    let e = Policy::load(&f).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("policy.toml") && msg.contains("line 4"),
        "{msg}"
    );
    let missing = Policy::load(&dir.path().join("nope.toml")).unwrap_err();
    assert!(matches!(missing, PolicyError::Read { .. }), "{missing}");
    std::fs::write(&f, "default = \"deny\"\n").unwrap();
    assert_eq!(
        Policy::load(&f).unwrap(),
        Policy::with_default(Action::Deny)
    );
}

#[test]
fn over_long_subjects_fall_to_default() {
    let pol = p("default = \"deny\"\n[[rule]]\naction = \"allow\"\npath = \"**\"\n");
    assert_eq!(pol.decide(&Subject::path("/a")), Action::Allow);
    assert_eq!(
        pol.decide(&Subject::path("/".repeat(MAX_SUBJECT_LEN + 1))),
        Action::Deny
    );
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![Just(Action::Allow), Just(Action::Ask), Just(Action::Deny)]
}

proptest! {
    /// A generated policy parses, keeps its rules in order, and decide() equals a first-match
    /// scan written independently here.
    #[test]
    fn generated_policies_round_trip(
        default in action(),
        rules in proptest::collection::vec((action(), "[a-c*]{1,4}", proptest::bool::ANY), 0..6),
        probe in "[a-c]{0,4}",
    ) {
        let mut text = format!("default = \"{default}\"\n");
        for (a, g, is_host) in &rules {
            let key = if *is_host { "host" } else { "path" };
            text.push_str(&format!("\n[[rule]]\naction = \"{a}\"\n{key} = \"{g}\"\n"));
        }
        let pol = Policy::from_toml_str(&text).unwrap();
        prop_assert_eq!(pol.rules.len(), rules.len());
        for s in [Subject::host(probe.clone()), Subject::path(probe.clone())] {
            let mut expect = default;
            for (a, g, is_host) in &rules {
                let field = if *is_host { &s.host } else { &s.path };
                if let Some(v) = field {
                    if crate::glob::Glob::new(g).unwrap().matches(v) {
                        expect = *a;
                        break;
                    }
                }
            }
            prop_assert_eq!(pol.decide(&s), expect);
        }
    }

    /// Arbitrary text never panics the parser; a refusal always names a line within the text.
    #[test]
    fn arbitrary_text_is_refused_cleanly(text in "\\PC{0,200}") {
        if let Err(e) = Policy::from_toml_str(&text) {
            let line = e.line().unwrap();
            prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1, "{} for {:?}", e, text);
        }
    }

    /// Arbitrary keys inside a rule are refused (a typo never widens a policy).
    #[test]
    fn unknown_rule_keys_refused(key in "[a-z_]{1,10}") {
        prop_assume!(!["action", "tool", "command", "path", "host"].contains(&key.as_str()));
        let text = format!("default = \"deny\"\n[[rule]]\naction = \"allow\"\n{key} = \"x\"\n");
        prop_assert!(Policy::from_toml_str(&text).is_err());
    }
}

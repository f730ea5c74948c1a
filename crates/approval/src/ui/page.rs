//! The approval page's HTML, rendered on the server. Every piece of text that came from a
//! sandbox or a caller (file names, diffs, host names, reasons, context) goes through [`esc`];
//! nothing from them is ever placed in a script or a URL.

use crate::broker::{HistoryEntry, Snapshot};
use crate::change::{ChangeKind, Diff};
use crate::crossing::{Crossing, Decision, PendingApproval};

/// HTML-escapes text for element content and double- or single-quoted attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters (other than newline and tab in diffs) are shown, not obeyed.
            c if c.is_control() && c != '\n' && c != '\t' => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            // Bidirectional overrides would reorder what is shown.
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1b1b1b; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .2em; }
h2 { font-size: 1.1em; margin-top: 1.5em; border-bottom: 1px solid #ccc; }
.sub { color: #555; margin: 0 0 1em; }
.item { background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: .8em 1em; margin: .8em 0; }
.item h3 { font-size: 1em; margin: 0 0 .3em; }
.meta { color: #555; font-size: .9em; margin: 0 0 .5em; }
table.files { border-collapse: collapse; margin: .4em 0; }
table.files td { padding: .1em .6em .1em 0; vertical-align: top; }
.kind-created { color: #176317; } .kind-modified { color: #7a5300; } .kind-deleted { color: #a11; }
.path { font-family: ui-monospace, monospace; }
pre.diff { background: #f4f4f4; padding: .5em; overflow-x: auto; max-height: 24em; margin: .3em 0; font-size: 12px; }
.add { color: #176317; } .del { color: #a11; } .hunk { color: #555; } .note { color: #777; font-style: italic; }
.actions { margin-top: .6em; display: flex; gap: .5em; flex-wrap: wrap; align-items: center; }
button { font: inherit; padding: .3em .8em; border-radius: 4px; border: 1px solid #888; background: #eee; cursor: pointer; }
button.approve { background: #dff0d8; border-color: #3c763d; }
button.deny { background: #f2dede; border-color: #a94442; }
input.reason { font: inherit; padding: .25em; min-width: 16em; }
.empty { color: #777; }
table.history { border-collapse: collapse; width: 100%; font-size: .9em; }
table.history td, table.history th { text-align: left; padding: .2em .5em; border-bottom: 1px solid #e3e3e3; vertical-align: top; }
.d-approved, .d-approved_files { color: #176317; } .d-denied, .d-timed_out { color: #a11; }
#status { color: #777; font-size: .85em; }
"#;

const SCRIPT: &str = r#"
(function () {
  var token = document.querySelector('meta[name="vmcp-token"]').content;
  var live = document.getElementById('live');
  var status = document.getElementById('status');
  var gen = live.getAttribute('data-generation');
  function save() {
    var s = { boxes: {}, reasons: {}, open: {} };
    live.querySelectorAll('.item').forEach(function (it) {
      var id = it.getAttribute('data-id');
      it.querySelectorAll('input.file').forEach(function (b) { s.boxes[id + '\u0000' + b.value] = b.checked; });
      var r = it.querySelector('input.reason'); if (r) s.reasons[id] = r.value;
      it.querySelectorAll('details').forEach(function (d, i) { s.open[id + '\u0000' + i] = d.open; });
    });
    return s;
  }
  function restore(s) {
    live.querySelectorAll('.item').forEach(function (it) {
      var id = it.getAttribute('data-id');
      it.querySelectorAll('input.file').forEach(function (b) {
        var k = id + '\u0000' + b.value; if (k in s.boxes) b.checked = s.boxes[k];
      });
      var r = it.querySelector('input.reason'); if (r && id in s.reasons) r.value = s.reasons[id];
      it.querySelectorAll('details').forEach(function (d, i) {
        var k = id + '\u0000' + i; if (k in s.open) d.open = s.open[k];
      });
    });
  }
  function refresh(wait) {
    var url = '/fragment?token=' + token + (wait ? '&since=' + gen : '');
    return fetch(url, { headers: { 'X-Vmcp-Client': 'page' } }).then(function (r) {
      if (!r.ok) throw new Error('HTTP ' + r.status);
      gen = r.headers.get('X-Generation') || gen;
      return r.text();
    }).then(function (html) {
      var s = save();
      live.innerHTML = html;
      restore(s);
      live.setAttribute('data-generation', gen);
      status.textContent = 'live';
    });
  }
  function loop() {
    refresh(true).then(loop, function (e) {
      status.textContent = 'disconnected (' + e.message + '); retrying';
      setTimeout(loop, 2000);
    });
  }
  function post(id, verb, body) {
    return fetch('/api/pending/' + encodeURIComponent(id) + '/' + verb, {
      method: 'POST',
      headers: { 'Authorization': 'Bearer ' + token, 'Content-Type': 'application/json', 'X-Vmcp-Client': 'page' },
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().then(function (j) { if (!r.ok) throw new Error(j.error || ('HTTP ' + r.status)); });
    }).then(function () { return refresh(false); }, function (e) { status.textContent = 'error: ' + e.message; });
  }
  document.addEventListener('click', function (ev) {
    var btn = ev.target.closest('button[data-act]');
    if (!btn) return;
    var it = btn.closest('.item');
    var id = it.getAttribute('data-id');
    var act = btn.getAttribute('data-act');
    if (act === 'approve') post(id, 'approve', {});
    else if (act === 'approve-files') {
      var files = [];
      it.querySelectorAll('input.file').forEach(function (b) { if (b.checked) files.push(b.value); });
      post(id, 'approve', { files: files });
    } else if (act === 'deny') {
      var r = it.querySelector('input.reason');
      post(id, 'deny', { reason: r ? r.value : '' });
    }
  });
  refresh(false).then(loop, function () { setTimeout(loop, 2000); });
})();
"#;

/// The whole page.
pub(crate) fn page(snap: &Snapshot, token: &str, nonce: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<meta name=\"vmcp-token\" content=\"{token}\">\
<title>vmcp approvals</title><style nonce=\"{nonce}\">{STYLE}</style></head><body>\
<h1>vmcp approvals</h1>\
<p class=\"sub\">What a tool does inside its VM is free; what would cross to this machine waits here. <span id=\"status\">loading</span></p>\
<div id=\"live\" data-generation=\"{}\">{}</div>\
<script nonce=\"{nonce}\">{SCRIPT}</script></body></html>\n",
        snap.generation,
        fragment(snap),
        token = esc(token),
        nonce = esc(nonce),
    )
}

/// The live part: pending items and the history.
pub(crate) fn fragment(snap: &Snapshot) -> String {
    let mut s = format!("<h2>Waiting ({})</h2>", snap.pending.len());
    if snap.pending.is_empty() {
        s.push_str("<p class=\"empty\">Nothing is waiting.</p>");
    }
    for p in &snap.pending {
        s.push_str(&item(p));
    }
    s.push_str("<h2>History</h2>");
    if snap.history.is_empty() {
        s.push_str("<p class=\"empty\">Nothing decided yet.</p>");
    } else {
        s.push_str(
            "<table class=\"history\"><tr><th>decided</th><th>what</th><th>decision</th><th>by</th></tr>",
        );
        for h in &snap.history {
            s.push_str(&history_row(h));
        }
        s.push_str("</table>");
    }
    s
}

fn size(n: Option<u64>) -> String {
    match n {
        Some(n) if n >= 10 * 1024 * 1024 => format!("{} MiB", n / (1024 * 1024)),
        Some(n) if n >= 10 * 1024 => format!("{} KiB", n / 1024),
        Some(n) => format!("{n} B"),
        None => "-".into(),
    }
}

fn item(p: &PendingApproval) -> String {
    let mut s = format!(
        "<section class=\"item\" data-id=\"{}\"><h3>{}</h3><p class=\"meta\">",
        esc(&p.id),
        esc(&p.crossing.headline())
    );
    if let Some(c) = &p.context {
        s.push_str(&format!(
            "caused by <span class=\"path\">{}</span> · ",
            esc(c)
        ));
    }
    s.push_str(&format!(
        "waiting since {} · denied at {} if nobody decides · id {}</p>",
        esc(&crate::time::rfc3339(p.created_at)),
        esc(&crate::time::rfc3339(p.expires_at)),
        esc(&p.id)
    ));
    let mut per_file = false;
    if let Crossing::ShareChanges { changes, .. } = &p.crossing {
        per_file = !changes.entries.is_empty();
        s.push_str("<table class=\"files\">");
        for e in &changes.entries {
            s.push_str(&format!(
                "<tr><td><input type=\"checkbox\" class=\"file\" checked value=\"{path}\" aria-label=\"approve {path}\"></td>\
<td class=\"kind-{kind}\">{kind}</td><td class=\"path\">{path}</td><td>{old} → {new}</td></tr>",
                path = esc(&e.path),
                kind = e.kind.as_str(),
                old = size(e.old_size),
                new = size(e.new_size),
            ));
        }
        s.push_str("</table>");
        if changes.omitted > 0 {
            s.push_str(&format!(
                "<p class=\"note\">{} more changes are not listed and will not be applied.</p>",
                changes.omitted
            ));
        }
        for r in &changes.refused {
            s.push_str(&format!(
                "<p class=\"note\">never copied back: <span class=\"path\">{}</span> ({})</p>",
                esc(&r.path),
                esc(&r.reason)
            ));
        }
        for e in &changes.entries {
            s.push_str(&format!(
                "<details{}><summary><span class=\"path\">{}</span> ({})</summary>",
                if changes.entries.len() <= 5 {
                    " open"
                } else {
                    ""
                },
                esc(&e.path),
                e.kind.as_str()
            ));
            match &e.diff {
                Diff::Text { unified, truncated } => {
                    s.push_str("<pre class=\"diff\">");
                    if unified.is_empty() {
                        let what = if e.kind == ChangeKind::Created {
                            "empty file"
                        } else {
                            "no text difference"
                        };
                        s.push_str(&format!("<span class=\"note\">{what}</span>"));
                    }
                    for line in unified.lines() {
                        let class = match line.as_bytes().first() {
                            Some(b'+') => "add",
                            Some(b'-') => "del",
                            Some(b'@') => "hunk",
                            Some(b'\\') => "note",
                            _ => "ctx",
                        };
                        s.push_str(&format!("<span class=\"{class}\">{}</span>\n", esc(line)));
                    }
                    if *truncated {
                        s.push_str("<span class=\"note\">(diff truncated)</span>");
                    }
                    s.push_str("</pre>");
                }
                Diff::Binary => s.push_str("<p class=\"note\">binary content: no text diff</p>"),
                Diff::TooLarge => s.push_str("<p class=\"note\">too large for a diff</p>"),
                Diff::Omitted => s.push_str(
                    "<p class=\"note\">diff omitted (the page's diff budget is spent)</p>",
                ),
            }
            s.push_str("</details>");
        }
    }
    s.push_str("<div class=\"actions\"><button class=\"approve\" data-act=\"approve\">Approve all</button>");
    if per_file {
        s.push_str("<button class=\"approve\" data-act=\"approve-files\">Approve checked files only</button>");
    }
    s.push_str(
        "<input class=\"reason\" type=\"text\" maxlength=\"500\" placeholder=\"reason (optional)\">\
<button class=\"deny\" data-act=\"deny\">Deny</button></div></section>",
    );
    s
}

fn history_row(h: &HistoryEntry) -> String {
    let detail = match &h.decision {
        Decision::Approved => "approved".to_owned(),
        Decision::ApprovedFiles { files } => {
            let names: Vec<String> = files.iter().map(|f| esc(f)).collect();
            format!(
                "approved {} file(s): <span class=\"path\">{}</span>",
                files.len(),
                names.join(", ")
            )
        }
        Decision::Denied { reason } => format!("denied: {}", esc(reason)),
        Decision::TimedOut => "timed out (denied)".to_owned(),
    };
    format!(
        "<tr><td>{}</td><td>{}</td><td class=\"d-{}\">{}</td><td>{}</td></tr>",
        esc(&crate::time::rfc3339(h.decided_at)),
        esc(&h.item.crossing.headline()),
        h.decision.as_str(),
        detail,
        esc(&h.by)
    )
}

/// A refusal page (wrong token, wrong Host).
pub(crate) fn refusal(msg: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>vmcp approvals</title></head>\
<body><h1>vmcp approvals</h1><p>{}</p></body></html>\n",
        esc(msg)
    )
}

#[cfg(test)]
mod tests {
    use super::esc;

    #[test]
    fn escapes_hostile_text() {
        assert_eq!(
            esc("<script>\"a\"&'b'</script>"),
            "&lt;script&gt;&quot;a&quot;&amp;&#39;b&#39;&lt;/script&gt;"
        );
        assert_eq!(esc("a\u{1b}[2Jb\u{202e}"), "a\\u{1b}[2Jb\\u{202e}");
        assert_eq!(esc("tab\there\n"), "tab\there\n");
    }
}

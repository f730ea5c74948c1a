//! A small line diff producing unified-diff hunks, bounded in time, memory and output.
//!
//! Common prefix and suffix lines are trimmed first; the middle is aligned with a longest-common-
//! subsequence table when it has at most [`MAX_CELLS`] cells, and otherwise shown as one block
//! removed and one block added (correct, just less minimal). The output stops at `max_bytes`
//! with a `\ diff truncated` marker line.

/// Largest LCS table (rows × columns) computed.
const MAX_CELLS: usize = 1_000_000;
/// Context lines around each change.
const CONTEXT: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Keep,
    Del,
    Add,
}

/// The unified diff (hunks only, no `---`/`+++` header) of `old` → `new`, at most about
/// `max_bytes` long; `(text, truncated)`.
pub(crate) fn unified(old: &str, new: &str, max_bytes: usize) -> (String, bool) {
    let a: Vec<&str> = old.split_inclusive('\n').collect();
    let b: Vec<&str> = new.split_inclusive('\n').collect();
    let ops = align(&a, &b);
    render(&a, &b, &ops, max_bytes)
}

fn align(a: &[&str], b: &[&str]) -> Vec<Op> {
    let pre = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suf = a[pre..]
        .iter()
        .rev()
        .zip(b[pre..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (ma, mb) = (&a[pre..a.len() - suf], &b[pre..b.len() - suf]);
    let mut ops = vec![Op::Keep; pre];
    let cells = (ma.len() + 1).saturating_mul(mb.len() + 1);
    if cells <= MAX_CELLS {
        // lcs[i][j]: LCS length of ma[i..] and mb[j..].
        let w = mb.len() + 1;
        let mut lcs = vec![0u32; cells];
        for i in (0..ma.len()).rev() {
            for j in (0..mb.len()).rev() {
                lcs[i * w + j] = if ma[i] == mb[j] {
                    lcs[(i + 1) * w + j + 1] + 1
                } else {
                    lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < ma.len() || j < mb.len() {
            if i < ma.len() && j < mb.len() && ma[i] == mb[j] {
                ops.push(Op::Keep);
                i += 1;
                j += 1;
            } else if i < ma.len() && (j == mb.len() || lcs[(i + 1) * w + j] >= lcs[i * w + j + 1])
            {
                ops.push(Op::Del);
                i += 1;
            } else {
                ops.push(Op::Add);
                j += 1;
            }
        }
    } else {
        ops.extend(std::iter::repeat_n(Op::Del, ma.len()));
        ops.extend(std::iter::repeat_n(Op::Add, mb.len()));
    }
    ops.extend(std::iter::repeat_n(Op::Keep, suf));
    ops
}

fn render(a: &[&str], b: &[&str], ops: &[Op], max_bytes: usize) -> (String, bool) {
    // Positions in a and b before each op.
    let mut pos = Vec::with_capacity(ops.len() + 1);
    let (mut i, mut j) = (0usize, 0usize);
    for op in ops {
        pos.push((i, j));
        match op {
            Op::Keep => {
                i += 1;
                j += 1;
            }
            Op::Del => i += 1,
            Op::Add => j += 1,
        }
    }
    pos.push((i, j));
    let changed: Vec<usize> = (0..ops.len())
        .filter(|k| ops[k.to_owned()] != Op::Keep)
        .collect();
    let mut out = String::new();
    let mut k = 0;
    while k < changed.len() {
        // A hunk spans changes less than 2*CONTEXT+1 keeps apart.
        let start = changed[k].saturating_sub(CONTEXT);
        let mut last = changed[k];
        k += 1;
        while k < changed.len() && changed[k] - last <= 2 * CONTEXT {
            last = changed[k];
            k += 1;
        }
        let end = (last + 1 + CONTEXT).min(ops.len());
        let (a0, b0) = pos[start];
        let (a1, b1) = pos[end];
        let header = format!("@@ -{} +{} @@\n", range(a0, a1 - a0), range(b0, b1 - b0));
        if !push(&mut out, &header, max_bytes) {
            return (out, true);
        }
        for (op, &(ia, ib)) in ops[start..end].iter().zip(&pos[start..end]) {
            let (sign, line) = match op {
                Op::Keep => (' ', a[ia]),
                Op::Del => ('-', a[ia]),
                Op::Add => ('+', b[ib]),
            };
            let mut l = String::with_capacity(line.len() + 2);
            l.push(sign);
            l.push_str(line);
            if !line.ends_with('\n') {
                l.push_str("\n\\ No newline at end of file\n");
            }
            if !push(&mut out, &l, max_bytes) {
                return (out, true);
            }
        }
    }
    (out, false)
}

fn range(start: usize, len: usize) -> String {
    match len {
        0 => format!("{start},0"),
        1 => format!("{}", start + 1),
        n => format!("{},{n}", start + 1),
    }
}

/// Appends `s` if it fits in `max`; else appends the truncation marker and returns false.
fn push(out: &mut String, s: &str, max: usize) -> bool {
    if out.len() + s.len() > max {
        out.push_str("\\ diff truncated\n");
        return false;
    }
    out.push_str(s);
    true
}

#[cfg(test)]
mod tests {
    use super::unified;
    use proptest::prelude::*;

    #[test]
    fn small_change() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\n";
        let new = "a\nb\nc\nD\ne\nf\ng\nh\n";
        let (d, t) = unified(old, new, 10_000);
        assert!(!t);
        assert_eq!(d, "@@ -1,7 +1,7 @@\n a\n b\n c\n-d\n+D\n e\n f\n g\n");
    }

    #[test]
    fn creation_and_no_newline() {
        let (d, _) = unified("", "x\ny", 10_000);
        assert_eq!(d, "@@ -0,0 +1,2 @@\n+x\n+y\n\\ No newline at end of file\n");
        let (d, _) = unified("same\n", "same\n", 10_000);
        assert_eq!(d, "");
    }

    #[test]
    fn truncates() {
        let new: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let (d, t) = unified("", &new, 200);
        assert!(t);
        assert!(d.len() <= 200 + 20, "{}", d.len());
        assert!(d.ends_with("\\ diff truncated\n"));
    }

    #[test]
    fn big_middle_falls_back() {
        let old: String = (0..2000).map(|i| format!("o{i}\n")).collect();
        let new: String = (0..2000).map(|i| format!("n{i}\n")).collect();
        let (d, t) = unified(&old, &new, 1 << 20);
        assert!(!t);
        assert_eq!(d.lines().filter(|l| l.starts_with('-')).count(), 2000);
        assert_eq!(d.lines().filter(|l| l.starts_with('+')).count(), 2000);
    }

    /// Applying the hunks' `-`/`+`/` ` lines reconstructs both sides (one big hunk context).
    fn sides(d: &str) -> (String, String) {
        let (mut o, mut n) = (String::new(), String::new());
        for l in d.split_inclusive('\n') {
            if l.starts_with("@@") || l.starts_with('\\') {
                continue;
            }
            let (s, rest) = l.split_at(1);
            match s {
                " " => {
                    o.push_str(rest);
                    n.push_str(rest);
                }
                "-" => o.push_str(rest),
                "+" => n.push_str(rest),
                _ => unreachable!(),
            }
        }
        (o, n)
    }

    proptest! {
        #[test]
        fn diff_lines_are_consistent(
            old in proptest::collection::vec("[ab]{0,2}", 0..12),
            new in proptest::collection::vec("[ab]{0,2}", 0..12),
        ) {
            let old: String = old.iter().map(|l| format!("{l}\n")).collect();
            let new: String = new.iter().map(|l| format!("{l}\n")).collect();
            let (d, t) = unified(&old, &new, 1 << 20);
            prop_assert!(!t);
            let (o, n) = sides(&d);
            // Every removed line came from old and every added line goes to new, in order.
            prop_assert!(is_subsequence(&o, &old), "{d}");
            prop_assert!(is_subsequence(&n, &new), "{d}");
            prop_assert_eq!(d.is_empty(), old == new);
        }
    }

    proptest! {
        /// The same invariants as the `approval_diff` fuzz target, on arbitrary text.
        #[test]
        fn bounded_and_empty_only_when_equal(old in "(\\PC|\n|a\n){0,100}", new in "(\\PC|\n|a\n){0,100}", max in 1usize..400) {
            let (d, truncated) = unified(&old, &new, max);
            prop_assert!(d.len() <= max + "\\ diff truncated\n".len());
            if !truncated {
                prop_assert_eq!(d.is_empty(), old == new);
            }
        }
    }

    fn is_subsequence(sub: &str, full: &str) -> bool {
        let mut it = full.split_inclusive('\n');
        sub.split_inclusive('\n').all(|l| it.any(|f| f == l))
    }
}

//! Sharding rules: which parameters are split how, and which pipeline stage holds them.
//!
//! A rules file is a list of lines, first match wins:
//!
//! ```text
//! # comment
//! *.attention.wq.weight        = [mp, 1]
//! *.attention.wo.weight        = [1, mp]
//! re:\.w(1|3)\.weight$         = [mp, 1]
//! *tok_embeddings*             = [mp, 1] or replicate
//! *norm*                       = replicate
//! my_table                     = [dp*mp, 1]
//! debug_buffer                 = skip
//! stage *tok_embeddings*       = first, last
//! stage *.lm_head*             = 1
//! ```
//!
//! Patterns are globs (`*`, `?`) matched against the whole parameter name, or `re:` regular
//! expressions searched in it (see [`super::pattern`]). Rules see names without the optimizer
//! prefixes (`adam_m.`, `adam_v.`, `accu_grads.`): optimizer states follow their parameter.
//!
//! A split gives one entry per tensor dim: `1` (not split), `mp` (the model-parallel axis, the
//! rightmost of the device matrix `[dp, mp]`), `dp`, or `dp*mp` (split over both, dp outermost;
//! written as MindSpore's nested tensor map). `replicate` is every dim `1`; `skip` writes no
//! layout at all (the parameter is then copied whole, like `global_step`). `A or B` takes the
//! first alternative that divides the parameter's shape, as MindFormers falls back to a
//! replicated embedding when the vocabulary does not divide by mp.
//!
//! A stage rule gives one or more stages (`0`, `1`, ..., `first`, `last`); a parameter in several
//! stages is shared between them (a tied embedding).

use super::pattern::Pattern;
use crate::error::{Error, Result};

/// A device axis of the per-stage device matrix `[dp, mp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    /// Data parallel: the left axis (tensor_map value 1).
    Dp,
    /// Model parallel: the right axis (tensor_map value 0).
    Mp,
}

impl Axis {
    /// The tensor_map value MindSpore writes for this axis (axes count from the right).
    pub fn map_value(self) -> i32 {
        match self {
            Axis::Mp => 0,
            Axis::Dp => 1,
        }
    }

    /// The rule-file name.
    pub fn name(self) -> &'static str {
        match self {
            Axis::Mp => "mp",
            Axis::Dp => "dp",
        }
    }
}

/// What a rule does with a matching parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// Per tensor dim, the device axes splitting it (outermost first); empty = not split.
    Dims(Vec<Vec<Axis>>),
    /// Every dim unsplit, whatever the rank of the tensor.
    Replicate,
    /// No layout item (the parameter is left out of the strategy).
    Skip,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Split::Replicate => f.write_str("replicate"),
            Split::Skip => f.write_str("skip"),
            Split::Dims(d) => {
                let parts: Vec<String> = d
                    .iter()
                    .map(|axes| {
                        if axes.is_empty() {
                            "1".to_string()
                        } else {
                            axes.iter().map(|a| a.name()).collect::<Vec<_>>().join("*")
                        }
                    })
                    .collect();
                write!(f, "[{}]", parts.join(", "))
            }
        }
    }
}

/// A pipeline stage named in a stage rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageRef {
    /// A stage number.
    Num(u32),
    /// Stage 0.
    First,
    /// The last stage (pp - 1).
    Last,
}

/// `PATTERN = SPLIT [or SPLIT ...]`.
#[derive(Debug, Clone)]
pub struct SplitRule {
    /// Which names.
    pub pattern: Pattern,
    /// Alternatives, in order of preference.
    pub choices: Vec<Split>,
    /// Where the rule was written (`file:line`).
    pub origin: String,
    /// A rule that matches no parameter is an error (user rules) or fine (built-in sets).
    pub strict: bool,
}

/// `stage PATTERN = STAGE[, STAGE ...]`.
#[derive(Debug, Clone)]
pub struct StageRule {
    /// Which names.
    pub pattern: Pattern,
    /// The stages.
    pub stages: Vec<StageRef>,
    /// Where the rule was written.
    pub origin: String,
    /// See [`SplitRule::strict`].
    pub strict: bool,
}

/// An ordered rule set.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Split rules, first match wins.
    pub splits: Vec<SplitRule>,
    /// Stage rules, first match wins.
    pub stages: Vec<StageRule>,
}

/// The built-in rule sets: (name, description, text).
pub const BUILTIN: &[(&str, &str, &str)] = &[
    (
        "llama",
        "MindFormers llama-style decoder, vocabulary-parallel embedding and lm_head (vocab_emb_dp: False)",
        include_str!("../rules/llama.rules"),
    ),
    (
        "llama-vocab-dp",
        "MindFormers llama-style decoder, replicated embedding and lm_head (vocab_emb_dp: True, the MindFormers default)",
        include_str!("../rules/llama_vocab_dp.rules"),
    ),
];

impl Rules {
    /// No rules.
    pub fn new() -> Rules {
        Rules::default()
    }

    /// A built-in rule set by name (`llama`, `llama-vocab-dp`); its rules may match nothing.
    pub fn builtin(name: &str) -> Result<Rules> {
        let (n, _, text) = BUILTIN.iter().find(|(n, _, _)| *n == name).ok_or_else(|| {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _, _)| *n).collect();
            Error::Invalid(format!("unknown built-in rule set '{name}'; available: {}, or 'none'", names.join(", ")))
        })?;
        Rules::parse(text, &format!("built-in rules '{n}'"), false)
    }

    /// Parses rules text; `origin` names it in errors (a file path), `strict` makes rules that
    /// match no parameter an error later.
    pub fn parse(text: &str, origin: &str, strict: bool) -> Result<Rules> {
        let mut rules = Rules::new();
        for (i, raw) in text.lines().enumerate() {
            let at = format!("{origin}:{}", i + 1);
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            let bad = |d: String| Error::Invalid(format!("{at}: {d} (in '{}')", raw.trim()));
            let (is_stage, body) = match line.strip_prefix("stage") {
                Some(rest) if rest.starts_with(char::is_whitespace) => (true, rest.trim()),
                _ => (false, line),
            };
            let Some((lhs, rhs)) = body.rsplit_once('=') else {
                return Err(bad("expected 'PATTERN = SPLIT' or 'stage PATTERN = STAGES'".into()));
            };
            let pattern = Pattern::parse(lhs.trim()).map_err(|e| bad(format!("bad pattern: {e}")))?;
            if is_stage {
                let stages = parse_stages(rhs.trim()).map_err(bad)?;
                rules.stages.push(StageRule { pattern, stages, origin: at, strict });
            } else {
                let choices = parse_choices(rhs.trim()).map_err(bad)?;
                rules.splits.push(SplitRule { pattern, choices, origin: at, strict });
            }
        }
        Ok(rules)
    }

    /// Appends `other` after these rules (so these win).
    pub fn extend(&mut self, other: Rules) {
        self.splits.extend(other.splits);
        self.stages.extend(other.stages);
    }
}

/// `#` starts a comment at the start of a line or after whitespace (a regex may contain `#`).
fn strip_comment(line: &str) -> &str {
    let b = line.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'#' && (i == 0 || b[i - 1].is_ascii_whitespace()) {
            return &line[..i];
        }
    }
    line
}

fn parse_choices(s: &str) -> Result<Vec<Split>, String> {
    let words: Vec<&str> = s.split_whitespace().collect();
    let mut parts = Vec::new();
    let mut cur = String::new();
    for w in words {
        if w == "or" {
            parts.push(std::mem::take(&mut cur));
        } else {
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(w);
        }
    }
    parts.push(cur);
    parts.iter().map(|p| parse_split(p)).collect()
}

fn parse_split(s: &str) -> Result<Split, String> {
    match s {
        "" => return Err("missing split after '=' (or around 'or')".into()),
        "replicate" => return Ok(Split::Replicate),
        "skip" => return Ok(Split::Skip),
        _ => {}
    }
    let inner = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .ok_or_else(|| format!("bad split '{s}': expected a list like [mp, 1], 'replicate' or 'skip'"))?;
    let mut dims = Vec::new();
    let mut used: Vec<Axis> = Vec::new();
    for e in inner.split(',') {
        let e = e.trim();
        if e.is_empty() {
            return Err(format!("bad split '{s}': an empty entry"));
        }
        if e == "1" || e.eq_ignore_ascii_case("none") {
            dims.push(Vec::new());
            continue;
        }
        let mut axes = Vec::new();
        for t in e.split('*') {
            let a = match t.trim() {
                "mp" => Axis::Mp,
                "dp" => Axis::Dp,
                other => return Err(format!("bad split entry '{other}' in '{s}': use 1, mp, dp or dp*mp")),
            };
            if used.contains(&a) {
                return Err(format!(
                    "bad split '{s}': axis {} is used twice (a device axis can split one dim once)",
                    a.name()
                ));
            }
            used.push(a);
            axes.push(a);
        }
        dims.push(axes);
    }
    Ok(Split::Dims(dims))
}

fn parse_stages(s: &str) -> Result<Vec<StageRef>, String> {
    let mut out = Vec::new();
    for e in s.split(',') {
        let e = e.trim();
        let r =
            match e {
                "first" => StageRef::First,
                "last" => StageRef::Last,
                n => StageRef::Num(n.parse().map_err(|_| {
                    format!("bad stage '{n}': use a stage number, 'first' or 'last', separated by commas")
                })?),
            };
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse() {
        let r = Rules::parse(
            "# c\n*.wq.weight = [mp, 1]  # trailing\nre:w#1 = [1, dp*mp]\n\n*emb* = [mp, 1] or replicate\n\
             x = skip\nstage *head* = last, 0\n",
            "f",
            true,
        )
        .unwrap();
        assert_eq!(r.splits.len(), 4);
        assert_eq!(r.splits[0].choices, vec![Split::Dims(vec![vec![Axis::Mp], vec![]])]);
        assert_eq!(r.splits[1].pattern.source, "re:w#1");
        assert_eq!(r.splits[1].choices, vec![Split::Dims(vec![vec![], vec![Axis::Dp, Axis::Mp]])]);
        assert_eq!(r.splits[2].choices.len(), 2);
        assert_eq!(r.splits[3].choices, vec![Split::Skip]);
        assert_eq!(r.stages[0].stages, vec![StageRef::Last, StageRef::Num(0)]);
        assert_eq!(r.splits[1].origin, "f:3");
        assert_eq!(format!("{}", r.splits[1].choices[0]), "[1, dp*mp]");
    }

    #[test]
    fn bad_rules_name_the_line() {
        for (text, want) in [
            ("a = [mp, mp]", "used twice"),
            ("a = [tp, 1]", "bad split entry 'tp'"),
            ("a [mp, 1]", "expected 'PATTERN = SPLIT'"),
            ("stage a = middle", "bad stage 'middle'"),
            ("re:( = [mp]", "bad pattern"),
            ("a = ", "missing split"),
        ] {
            let e = Rules::parse(text, "r.rules", true).unwrap_err().to_string();
            assert!(e.contains("r.rules:1") && e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn builtins_parse() {
        for (n, _, _) in BUILTIN {
            assert!(!Rules::builtin(n).unwrap().splits.is_empty());
        }
        assert!(Rules::builtin("gpt").is_err());
    }
}

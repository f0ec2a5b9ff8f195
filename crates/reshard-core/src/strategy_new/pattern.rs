//! Parameter-name patterns of sharding rules: globs (`*` any run of characters, `?` one
//! character, anything else literal, matched against the whole name) and `re:` regular
//! expressions (searched anywhere in the name, as Python's `re.search`; anchor with `^`/`$`).
//!
//! The regex dialect is the common subset of Python's and Rust's: literals, `.`, classes
//! (`[a-z_]`, `[^.]`, `\d \w \s \D \W \S`), groups `( )` and `(?: )`, alternation `|`,
//! quantifiers `* + ? {n} {n,} {n,m}` (greedy, or lazy with a trailing `?`) and anchors `^ $`.
//! It is a small backtracking matcher with a step budget, written here because the core has
//! no regex dependency; names are short, so speed does not matter, but a pathological pattern
//! must not hang the tool.

use std::cell::Cell;

/// A compiled name pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// The text as written in the rule (`re:` prefix included).
    pub source: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Glob(Vec<char>),
    Regex(Node),
}

impl Pattern {
    /// Compiles `text`: `re:REGEX` or a glob.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty pattern".into());
        }
        let kind = match text.strip_prefix("re:") {
            Some(re) => {
                if re.is_empty() {
                    return Err("empty regular expression after 're:'".into());
                }
                Kind::Regex(Parser::new(re).parse()?)
            }
            None => Kind::Glob(text.chars().collect()),
        };
        Ok(Pattern { source: text.to_string(), kind })
    }

    /// Whether `name` matches. A regex that needs more than the step budget is an error.
    pub fn matches(&self, name: &str) -> Result<bool, String> {
        match &self.kind {
            Kind::Glob(p) => {
                let n: Vec<char> = name.chars().collect();
                Ok(glob_match(p, &n))
            }
            Kind::Regex(node) => {
                let n: Vec<char> = name.chars().collect();
                let m = Matcher { text: &n, steps: Cell::new(0) };
                for start in 0..=n.len() {
                    if m.run(node, start, &mut |_| true) {
                        return Ok(true);
                    }
                    if m.steps.get() > STEP_BUDGET {
                        return Err(format!(
                            "regular expression '{}' takes too long on '{name}'; simplify it",
                            self.source
                        ));
                    }
                }
                Ok(false)
            }
        }
    }
}

/// Glob match of the whole name: `*` any run (dots included), `?` one character.
fn glob_match(p: &[char], n: &[char]) -> bool {
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == n[ni])) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

const STEP_BUDGET: u64 = 2_000_000;

#[derive(Debug, Clone)]
enum ClassItem {
    Range(char, char),
    Digit(bool),
    Word(bool),
    Space(bool),
}

impl ClassItem {
    fn has(&self, c: char) -> bool {
        match *self {
            ClassItem::Range(a, b) => a <= c && c <= b,
            ClassItem::Digit(neg) => c.is_ascii_digit() != neg,
            ClassItem::Word(neg) => (c.is_alphanumeric() || c == '_') != neg,
            ClassItem::Space(neg) => c.is_whitespace() != neg,
        }
    }
}

#[derive(Debug, Clone)]
enum Node {
    Char(char),
    Any,
    Class { items: Vec<ClassItem>, negated: bool },
    Start,
    End,
    Concat(Vec<Node>),
    Alt(Vec<Node>),
    Repeat { node: Box<Node>, min: u32, max: Option<u32>, greedy: bool },
}

struct Parser {
    s: Vec<char>,
    i: usize,
}

impl Parser {
    fn new(s: &str) -> Parser {
        Parser { s: s.chars().collect(), i: 0 }
    }

    fn peek(&self) -> Option<char> {
        self.s.get(self.i).copied()
    }

    fn parse(mut self) -> Result<Node, String> {
        let n = self.alt()?;
        if self.i < self.s.len() {
            return Err(format!("unbalanced ')' at position {}", self.i));
        }
        Ok(n)
    }

    fn alt(&mut self) -> Result<Node, String> {
        let mut branches = vec![self.concat()?];
        while self.peek() == Some('|') {
            self.i += 1;
            branches.push(self.concat()?);
        }
        Ok(if branches.len() == 1 { branches.pop().unwrap_or(Node::Concat(Vec::new())) } else { Node::Alt(branches) })
    }

    fn concat(&mut self) -> Result<Node, String> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom()?;
            items.push(self.quantified(atom)?);
        }
        Ok(Node::Concat(items))
    }

    fn quantified(&mut self, atom: Node) -> Result<Node, String> {
        let at = self.i;
        let (min, max) = match self.peek() {
            Some('*') => {
                self.i += 1;
                (0, None)
            }
            Some('+') => {
                self.i += 1;
                (1, None)
            }
            Some('?') => {
                self.i += 1;
                (0, Some(1))
            }
            Some('{') => match self.counted() {
                Some(mm) => mm,
                None => return Ok(atom), // a '{' that is no quantifier is a literal, as in Python
            },
            _ => return Ok(atom),
        };
        if matches!(atom, Node::Start | Node::End) {
            return Err(format!("nothing to repeat at position {at}"));
        }
        if let Some(mx) = max {
            if mx < min {
                return Err(format!("bad repeat range {{{min},{mx}}} at position {at}"));
            }
        }
        let greedy = if self.peek() == Some('?') {
            self.i += 1;
            false
        } else {
            true
        };
        if matches!(self.peek(), Some('*' | '+' | '?')) {
            return Err(format!("multiple repeat at position {}", self.i));
        }
        Ok(Node::Repeat { node: Box::new(atom), min, max, greedy })
    }

    /// `{n}`, `{n,}`, `{n,m}`; None (and no input consumed) when it is not one.
    fn counted(&mut self) -> Option<(u32, Option<u32>)> {
        let rest: String = self.s[self.i..].iter().collect();
        let close = rest.find('}')?;
        let body = &rest[1..close];
        let num = |t: &str| -> Option<u32> {
            if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                t.parse().ok()
            } else {
                None
            }
        };
        let r = match body.split_once(',') {
            None => {
                let n = num(body)?;
                (n, Some(n))
            }
            Some((a, "")) => (num(a)?, None),
            Some((a, b)) => (num(a)?, Some(num(b)?)),
        };
        self.i += rest[..=close].chars().count();
        Some(r)
    }

    fn atom(&mut self) -> Result<Node, String> {
        let at = self.i;
        let Some(c) = self.peek() else {
            return Err("unexpected end of pattern".into());
        };
        self.i += 1;
        Ok(match c {
            '(' => {
                if self.s[self.i..].starts_with(&['?', ':']) {
                    self.i += 2;
                } else if self.peek() == Some('?') {
                    return Err(format!("unsupported group syntax '(?' at position {at} (only '(?:' is supported)"));
                }
                let inner = self.alt()?;
                if self.peek() != Some(')') {
                    return Err(format!("missing ')' for the group opened at position {at}"));
                }
                self.i += 1;
                inner
            }
            '[' => self.class(at)?,
            '.' => Node::Any,
            '^' => Node::Start,
            '$' => Node::End,
            '*' | '+' | '?' => return Err(format!("nothing to repeat at position {at}")),
            '\\' => match self.escape(at)? {
                Esc::Char(c) => Node::Char(c),
                Esc::Class(item) => Node::Class { items: vec![item], negated: false },
            },
            c => Node::Char(c),
        })
    }

    fn escape(&mut self, at: usize) -> Result<Esc, String> {
        let Some(c) = self.peek() else {
            return Err(format!("a trailing '\\' at position {at}"));
        };
        self.i += 1;
        Ok(match c {
            'd' => Esc::Class(ClassItem::Digit(false)),
            'D' => Esc::Class(ClassItem::Digit(true)),
            'w' => Esc::Class(ClassItem::Word(false)),
            'W' => Esc::Class(ClassItem::Word(true)),
            's' => Esc::Class(ClassItem::Space(false)),
            'S' => Esc::Class(ClassItem::Space(true)),
            'n' => Esc::Char('\n'),
            't' => Esc::Char('\t'),
            c if c.is_ascii_alphanumeric() => return Err(format!("unsupported escape '\\{c}' at position {at}")),
            c => Esc::Char(c),
        })
    }

    fn class(&mut self, at: usize) -> Result<Node, String> {
        let mut negated = false;
        if self.peek() == Some('^') {
            negated = true;
            self.i += 1;
        }
        let mut items = Vec::new();
        let mut first = true;
        loop {
            let Some(c) = self.peek() else {
                return Err(format!("missing ']' for the class opened at position {at}"));
            };
            if c == ']' && !first {
                self.i += 1;
                break;
            }
            first = false;
            self.i += 1;
            let lo = if c == '\\' {
                match self.escape(self.i - 1)? {
                    Esc::Char(c) => c,
                    Esc::Class(item) => {
                        items.push(item);
                        continue;
                    }
                }
            } else {
                c
            };
            // a range a-z (a '-' before ']' is literal)
            if self.peek() == Some('-') && self.s.get(self.i + 1).is_some_and(|&n| n != ']') {
                self.i += 1;
                let Some(mut hi) = self.peek() else {
                    return Err(format!("missing ']' for the class opened at position {at}"));
                };
                self.i += 1;
                if hi == '\\' {
                    match self.escape(self.i - 1)? {
                        Esc::Char(c) => hi = c,
                        Esc::Class(_) => return Err(format!("bad range in the class at position {at}")),
                    }
                }
                if hi < lo {
                    return Err(format!("bad range {lo}-{hi} in the class at position {at}"));
                }
                items.push(ClassItem::Range(lo, hi));
            } else {
                items.push(ClassItem::Range(lo, lo));
            }
        }
        Ok(Node::Class { items, negated })
    }
}

enum Esc {
    Char(char),
    Class(ClassItem),
}

struct Matcher<'a> {
    text: &'a [char],
    steps: Cell<u64>,
}

impl Matcher<'_> {
    /// Matches `node` at `pos`, then calls `k` with the end; true when `k` accepts.
    fn run(&self, node: &Node, pos: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
        let s = self.steps.get() + 1;
        self.steps.set(s);
        if s > STEP_BUDGET {
            return false;
        }
        let t = self.text;
        match node {
            Node::Char(c) => pos < t.len() && t[pos] == *c && k(pos + 1),
            Node::Any => pos < t.len() && t[pos] != '\n' && k(pos + 1),
            Node::Class { items, negated } => {
                pos < t.len() && (items.iter().any(|i| i.has(t[pos])) != *negated) && k(pos + 1)
            }
            Node::Start => pos == 0 && k(pos),
            Node::End => pos == t.len() && k(pos),
            Node::Concat(items) => self.seq(items, pos, k),
            Node::Alt(branches) => branches.iter().any(|b| self.run(b, pos, k)),
            Node::Repeat { node, min, max, greedy } => self.repeat(node, *min, *max, *greedy, 0, pos, k),
        }
    }

    fn seq(&self, items: &[Node], pos: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
        match items.split_first() {
            None => k(pos),
            Some((first, rest)) => self.run(first, pos, &mut |p| self.seq(rest, p, k)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn repeat(
        &self,
        node: &Node,
        min: u32,
        max: Option<u32>,
        greedy: bool,
        count: u32,
        pos: usize,
        k: &mut dyn FnMut(usize) -> bool,
    ) -> bool {
        let can_more = max.is_none_or(|m| count < m);
        let more = |k: &mut dyn FnMut(usize) -> bool| {
            can_more
                && self.run(node, pos, &mut |p| {
                    // an empty iteration past the minimum would loop forever
                    (p != pos || count < min) && self.repeat(node, min, max, greedy, count + 1, p, k)
                })
        };
        if count < min {
            return more(k);
        }
        // greedy: as many repeats as possible first; lazy: as few
        if greedy {
            return more(k) || k(pos);
        }
        k(pos) || more(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        Pattern::parse(p).unwrap().matches(n).unwrap()
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(m("*.attention.wq.weight", "model.layers.0.attention.wq.weight"));
        assert!(!m("*.attention.wq.weight", "model.layers.0.attention.wq.weight.x"));
        assert!(m("*norm*", "model.norm_out.weight"));
        assert!(m("lm_head.weight", "lm_head.weight"));
        assert!(!m("lm_head.weight", "lm_headxweight.1"));
        assert!(m("model.layers.?.*", "model.layers.3.ffn_norm.weight"));
        assert!(!m("model.layers.?.*", "model.layers.13.ffn_norm.weight"));
        assert!(m("*", ""));
        assert!(m("a*b*c", "aXbYbc"));
    }

    #[test]
    fn regexes_search_with_python_semantics() {
        assert!(m(r"re:attention\.w[qkv]\.weight$", "model.layers.0.attention.wk.weight"));
        assert!(!m(r"re:attention\.w[qkv]\.weight$", "model.layers.0.attention.wo.weight"));
        assert!(m(r"re:^model\.layers\.\d+\.", "model.layers.12.x"));
        assert!(!m(r"re:^model\.layers\.\d+\.", "xmodel.layers.12.x"));
        assert!(m(r"re:(w1|w3)\.weight", "feed_forward.w3.weight"));
        assert!(m(r"re:(?:a|b){2,3}$", "xxaba"));
        assert!(!m(r"re:^(?:a|b){2,3}$", "abab"));
        assert!(m(r"re:^[^.]+\.weight$", "lm_head.weight"));
        assert!(!m(r"re:^[^.]+\.weight$", "model.norm.weight"));
        assert!(m(r"re:a{", "a{"));
        assert!(m(r"re:^a.*?b$", "axxb"));
        assert!(m(r"re:^(a*)*$", "aaaa"));
    }

    #[test]
    fn bad_regexes_are_refused() {
        for bad in ["re:(", "re:a)", "re:*a", "re:[a", r"re:\q", "re:", "re:(?P<x>a)"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pathological_regex_stops() {
        let p = Pattern::parse("re:^(a|a)*(a|a)*(a|a)*(a|a)*b$").unwrap();
        let name = "a".repeat(60);
        assert!(p.matches(&name).is_err());
    }
}

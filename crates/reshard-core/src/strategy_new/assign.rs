//! Choosing each parameter's layout and stages from the rules: `assign`.

#![allow(unused_imports)] // one import list for the split files of strategy_new
use super::*;

/// The layout chosen for one parameter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParamPlan {
    /// Parameter name.
    pub name: String,
    /// Full shape.
    pub shape: Vec<u64>,
    /// Per tensor dim, the device axes splitting it (outermost first); empty = not split.
    pub split: Vec<Vec<Axis>>,
    /// The stages holding it (several for a shared parameter).
    pub stages: Vec<u32>,
    /// `opt_weight_shard_step`.
    pub opt_shard_step: i32,
    /// `opt_weight_shard_size`.
    pub opt_shard_size: i32,
    /// The rule that chose the split (`file:line`).
    pub rule: String,
}

impl ParamPlan {
    /// The tensor map per dim (`[-1]` = not split), as MindSpore's parser yields it.
    pub fn tensor_map(&self) -> Vec<Vec<i32>> {
        self.split
            .iter()
            .map(|axes| if axes.is_empty() { vec![-1] } else { axes.iter().map(|a| a.map_value()).collect() })
            .collect()
    }

    /// Whether a dim is split over several axes (written as MindSpore's nested tensor map).
    pub fn nested(&self) -> bool {
        self.split.iter().any(|a| a.len() > 1)
    }

    /// The split as rule text, e.g. `[mp, 1]`.
    pub fn split_text(&self) -> String {
        Split::Dims(self.split.clone()).to_string()
    }

    /// The layout as the strategy parser yields it.
    pub fn param_layout(&self, dev: [u32; 2]) -> ParamLayout {
        ParamLayout {
            dev_matrix: dev.iter().map(|&d| u64::from(d)).collect(),
            tensor_map: self.tensor_map().into_iter().map(|v| v.into_iter().map(i64::from).collect()).collect(),
            nested: self.nested(),
            opt_shard_step: i64::from(self.opt_shard_step),
            opt_shard_size: i64::from(self.opt_shard_size),
            tensor_shape: None,
        }
    }
}

/// Why a parameter got no layout item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Omitted {
    /// A 0-d tensor or step/learning-rate bookkeeping, as MindSpore.
    Scalar,
    /// A rule said `skip`.
    Skipped {
        /// The rule.
        rule: String,
    },
    /// No rule matched. Transforms then copy it whole to every rank (replicated in effect).
    Unmatched,
}

/// The decisions for every parameter.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Assignment {
    /// Parameters with a layout, in input order.
    pub layouts: Vec<ParamPlan>,
    /// Parameters without one, and why.
    pub omitted: Vec<(String, Omitted)>,
    /// Number of `layers.{i}` found (highest index + 1).
    pub layers: u32,
}

impl Assignment {
    /// Non-scalar parameters that matched no rule.
    pub fn unmatched(&self) -> Vec<&str> {
        self.omitted.iter().filter(|(_, o)| *o == Omitted::Unmatched).map(|(n, _)| n.as_str()).collect()
    }

    /// The layouts of one stage, sorted by name (the order of the written files).
    pub fn stage_layouts(&self, stage: u32) -> Vec<&ParamPlan> {
        let mut v: Vec<&ParamPlan> = self.layouts.iter().filter(|p| p.stages.contains(&stage)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// The parameter name without an optimizer-state prefix, and whether it had one.
pub fn base_name(name: &str) -> (&str, bool) {
    for p in OPTIMIZER_PREFIXES {
        if let Some(rest) = name.strip_prefix(p) {
            return (rest, true);
        }
    }
    (name, false)
}

/// The `i` of a `layers.{i}.` (or `layer.{i}.` / `blocks.{i}.`) segment of a name.
pub fn layer_index(name: &str) -> Option<u32> {
    let segs: Vec<&str> = name.split('.').collect();
    segs.windows(2).find_map(|w| {
        (matches!(w[0], "layers" | "layer" | "blocks") && !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit()))
            .then(|| w[1].parse().ok())
            .flatten()
    })
}

pub(super) fn rules_path(origin: &str) -> PathBuf {
    PathBuf::from(origin)
}

/// Decides every parameter's split, stages and optimizer-shard fields, validating them.
pub fn assign(spec: &StrategySpec, params: &[ParamInfo]) -> Result<Assignment> {
    spec.validate()?;
    let mut seen = std::collections::HashSet::new();
    for p in params {
        if !seen.insert(p.name.as_str()) {
            return Err(Error::Invalid(format!("parameter '{}' appears twice in the input", p.name)));
        }
    }
    check_rules_match(spec, params)?;
    let layers =
        params.iter().filter_map(|p| layer_index(base_name(&p.name).0)).max().map_or(0, |m| m.saturating_add(1));
    let has_user_stage_rules = spec.rules.stages.iter().any(|r| r.strict);
    if spec.pp > 1 && spec.pp > layers && !(layers == 0 && has_user_stage_rules) {
        return Err(Error::Invalid(format!(
            "pp {} is larger than the number of layers ({layers}{}); use at most {} stages",
            spec.pp,
            if layers == 0 {
                ": no parameter name has a 'layers.{i}' part; assign stages with 'stage PATTERN = N' rules"
            } else {
                ", from the 'layers.{i}' parts of the names"
            },
            layers.max(1)
        )));
    }
    if let Some(l) = &spec.layers_per_stage {
        let sum: u64 = l.iter().map(|&x| u64::from(x)).sum();
        if sum != u64::from(layers) {
            return Err(Error::Invalid(format!(
                "layers per stage {l:?} add up to {sum}, but the checkpoint has {layers} layers"
            )));
        }
    }

    let mut out = Assignment { layers, ..Assignment::default() };
    // Weights first, so that optimizer states can take their weight's decisions.
    let mut decided: HashMap<String, ParamPlan> = HashMap::new();
    let order: Vec<&ParamInfo> =
        params.iter().filter(|p| !base_name(&p.name).1).chain(params.iter().filter(|p| base_name(&p.name).1)).collect();
    let mut omitted: HashMap<&str, Omitted> = HashMap::new();
    for p in order {
        let (base, is_state) = base_name(&p.name);
        if p.shape.is_empty() || BOOKKEEPING.contains(&base) {
            omitted.insert(&p.name, Omitted::Scalar);
            continue;
        }
        let Some(rule) = first_split_rule(spec, base)? else {
            omitted.insert(&p.name, Omitted::Unmatched);
            continue;
        };
        let split = choose_split(spec, rule, &p.name, &p.shape)?;
        let Some(split) = split else {
            omitted.insert(&p.name, Omitted::Skipped { rule: rule.origin.clone() });
            continue;
        };
        let stages = stages_of(spec, base, layers)?;
        let mut plan = ParamPlan {
            name: p.name.clone(),
            shape: p.shape.clone(),
            split,
            stages,
            opt_shard_step: 0,
            opt_shard_size: 0,
            rule: rule.origin.clone(),
        };
        let weight =
            if is_state { decided.get(base).filter(|w| w.split == plan.split && w.shape == plan.shape) } else { None };
        (plan.opt_shard_step, plan.opt_shard_size) = match weight {
            Some(w) => (w.opt_shard_step, w.opt_shard_size),
            None => opt_fields(spec, &plan, p.dtype),
        };
        // The same check the transform will do: every rank's box must exist.
        ResolvedLayout::new(&plan.param_layout(spec.dev_matrix()), &plan.shape, &plan.name, &rules_path(&rule.origin))?;
        decided.insert(p.name.clone(), plan);
    }
    for p in params {
        if let Some(plan) = decided.remove(&p.name) {
            out.layouts.push(plan);
        } else if let Some(o) = omitted.remove(p.name.as_str()) {
            out.omitted.push((p.name.clone(), o));
        }
    }
    if out.layouts.is_empty() {
        let unmatched = out.unmatched();
        return Err(Error::Invalid(format!(
            "no parameter got a layout: {} of {} parameters match no rule (e.g. {}); give rules with \
             --rules or a built-in set",
            unmatched.len(),
            params.len(),
            unmatched.iter().take(3).map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
        )));
    }
    for s in 0..spec.pp {
        if !out.layouts.iter().any(|p| p.stages.contains(&s)) {
            return Err(Error::Invalid(format!(
                "pipeline stage {s} of {} gets no parameter; MindSpore cannot merge an empty stage file \
                 (check the stage rules or --layers-per-stage)",
                spec.pp
            )));
        }
    }
    Ok(out)
}

/// Every user rule must match some parameter: a typo would otherwise silently do nothing.
pub(super) fn check_rules_match(spec: &StrategySpec, params: &[ParamInfo]) -> Result<()> {
    let names: Vec<&str> = params.iter().map(|p| base_name(&p.name).0).collect();
    let check = |pattern: &pattern::Pattern, origin: &str| -> Result<()> {
        for n in &names {
            if pattern.matches(n).map_err(|e| Error::Invalid(format!("{origin}: {e}")))? {
                return Ok(());
            }
        }
        let hint = if ["adam_m", "adam_v", "accu_grads"].iter().any(|x| pattern.source.contains(x)) {
            "; rules see names without the optimizer prefixes (adam_m., adam_v., accu_grads.)"
        } else {
            ""
        };
        Err(Error::Invalid(format!(
            "{origin}: pattern '{}' matches no parameter of the checkpoint{hint}",
            pattern.source
        )))
    };
    for r in spec.rules.splits.iter().filter(|r| r.strict) {
        check(&r.pattern, &r.origin)?;
    }
    for r in spec.rules.stages.iter().filter(|r| r.strict) {
        check(&r.pattern, &r.origin)?;
    }
    Ok(())
}

pub(super) fn first_split_rule<'a>(spec: &'a StrategySpec, base: &str) -> Result<Option<&'a SplitRule>> {
    for r in &spec.rules.splits {
        if r.pattern.matches(base).map_err(|e| Error::Invalid(format!("{}: {e}", r.origin)))? {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// The first alternative of `rule` that fits `shape`; `None` for `skip`.
pub(super) fn choose_split(
    spec: &StrategySpec,
    rule: &SplitRule,
    name: &str,
    shape: &[u64],
) -> Result<Option<Vec<Vec<Axis>>>> {
    let mut first_err = None;
    for choice in &rule.choices {
        let dims = match choice {
            Split::Skip => return Ok(None),
            Split::Replicate => return Ok(Some(vec![Vec::new(); shape.len()])),
            Split::Dims(d) => d,
        };
        match fits(spec, dims, shape) {
            Ok(()) => return Ok(Some(dims.clone())),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let detail = first_err.unwrap_or_default();
    let choices: Vec<String> = rule.choices.iter().map(|c| c.to_string()).collect();
    Err(Error::BadLayout {
        path: rules_path(&rule.origin),
        param: name.to_string(),
        detail: format!("{detail} (rule '{} = {}')", rule.pattern.source, choices.join(" or ")),
    })
}

pub(super) fn fits(spec: &StrategySpec, dims: &[Vec<Axis>], shape: &[u64]) -> Result<(), String> {
    if dims.len() != shape.len() {
        return Err(format!(
            "the split {} has {} entries but the parameter has {} dims (shape {shape:?})",
            Split::Dims(dims.to_vec()),
            dims.len(),
            shape.len()
        ));
    }
    for (i, (axes, &size)) in dims.iter().zip(shape).enumerate() {
        let ways: u64 = axes.iter().map(|&a| spec.axis_size(a)).product();
        if ways > 1 && size % ways != 0 {
            let by: Vec<String> = axes.iter().map(|&a| format!("{}={}", a.name(), spec.axis_size(a))).collect();
            return Err(format!("dim {i} of size {size} (shape {shape:?}) does not divide by {}", by.join("*")));
        }
    }
    Ok(())
}

pub(super) fn stages_of(spec: &StrategySpec, base: &str, layers: u32) -> Result<Vec<u32>> {
    for r in &spec.rules.stages {
        if r.pattern.matches(base).map_err(|e| Error::Invalid(format!("{}: {e}", r.origin)))? {
            let mut out = Vec::new();
            for s in &r.stages {
                let n = match *s {
                    StageRef::First => 0,
                    StageRef::Last => spec.pp - 1,
                    StageRef::Num(n) if n < spec.pp => n,
                    StageRef::Num(n) => {
                        return Err(Error::Invalid(format!(
                            "{}: stage {n} for '{base}' does not exist with pp {} (stages 0..{})",
                            r.origin,
                            spec.pp,
                            spec.pp - 1
                        )))
                    }
                };
                out.push(n);
            }
            out.sort_unstable();
            out.dedup();
            return Ok(out);
        }
    }
    Ok(vec![layer_index(base).map_or(0, |i| layer_stage(spec, i, layers))])
}

/// MindFormers' `layer_compute_dtype`: `min(i // max((layers + 1) // pp, 1), pp - 1)`.
pub(super) fn layer_stage(spec: &StrategySpec, i: u32, layers: u32) -> u32 {
    if let Some(per) = &spec.layers_per_stage {
        let mut end = 0u64;
        for (s, &n) in per.iter().enumerate() {
            end += u64::from(n);
            if u64::from(i) < end {
                return s as u32;
            }
        }
        return spec.pp - 1;
    }
    let per = (layers.saturating_add(1) / spec.pp).max(1);
    (i / per).min(spec.pp - 1)
}

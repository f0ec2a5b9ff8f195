//! What to make: the parameters (`ParamInfo`), the parallel layout and rules (`StrategySpec`), and
//! the options of `reshard strategy new` and the C ABI (`NewOptions`).

#![allow(unused_imports)] // one import list for the split files of strategy_new
use super::*;

/// One parameter of the model: its name, full shape and (if known) element type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Parameter name as in the checkpoint.
    pub name: String,
    /// Full (unsplit) shape.
    pub shape: Vec<u64>,
    /// Element type; used for the optimizer-shard size threshold (4 bytes when unknown).
    pub dtype: Option<DType>,
}

impl ParamInfo {
    /// A parameter of unknown element type.
    pub fn new(name: impl Into<String>, shape: Vec<u64>) -> ParamInfo {
        ParamInfo { name: name.into(), shape, dtype: None }
    }
}

/// The target layout.
#[derive(Debug, Clone)]
pub struct StrategySpec {
    /// Data-parallel size (left axis of the per-stage device matrix).
    pub dp: u32,
    /// Model-parallel size (right axis).
    pub mp: u32,
    /// Pipeline stages; each has `dp * mp` devices.
    pub pp: u32,
    /// Write optimizer-shard fields as MindSpore's `enable_parallel_optimizer` does.
    pub optimizer_shard: bool,
    /// `optimizer_weight_shard_size`: -1 (all replicas, MindSpore's default) or a size.
    pub opt_shard_size: i32,
    /// `parallel_optimizer_threshold` in KB: smaller parameters are not sharded (MindSpore: 64).
    pub opt_shard_threshold_kb: u64,
    /// Sharding and stage rules, first match wins.
    pub rules: Rules,
    /// Layers per stage, overriding MindFormers' default spreading of `layers.{i}`.
    pub layers_per_stage: Option<Vec<u32>>,
    /// The network name used in the node names of `parallel_strategy_item`.
    pub network_name: String,
}

impl StrategySpec {
    /// `dp x mp x pp` with the built-in `llama` rules, no optimizer shard.
    pub fn new(dp: u32, mp: u32, pp: u32) -> StrategySpec {
        StrategySpec {
            dp,
            mp,
            pp,
            optimizer_shard: false,
            opt_shard_size: -1,
            opt_shard_threshold_kb: 64,
            // The built-in text is covered by a unit test; an empty set would only mean no layouts.
            rules: Rules::builtin("llama").unwrap_or_default(),
            layers_per_stage: None,
            network_name: "LlamaForCausalLM".into(),
        }
    }

    /// Devices per stage.
    pub fn stage_devices(&self) -> u64 {
        u64::from(self.dp) * u64::from(self.mp)
    }

    /// The per-stage device matrix `[dp, mp]`.
    pub fn dev_matrix(&self) -> [u32; 2] {
        [self.dp, self.mp]
    }

    pub(super) fn axis_size(&self, a: Axis) -> u64 {
        match a {
            Axis::Dp => u64::from(self.dp),
            Axis::Mp => u64::from(self.mp),
        }
    }

    pub(super) fn validate(&self) -> Result<()> {
        if self.dp == 0 || self.mp == 0 || self.pp == 0 {
            return Err(Error::Invalid(format!(
                "dp, mp and pp must be at least 1 (dp*mp*pp >= 1); got dp {} mp {} pp {}",
                self.dp, self.mp, self.pp
            )));
        }
        if u32::try_from(self.stage_devices()).is_err()
            || self.stage_devices() * u64::from(self.pp) > u64::from(u32::MAX)
        {
            return Err(Error::Invalid(format!(
                "dp {} x mp {} x pp {} devices is too many",
                self.dp, self.mp, self.pp
            )));
        }
        if self.optimizer_shard && (self.opt_shard_size == 0 || self.opt_shard_size < -1) {
            return Err(Error::Invalid(format!(
                "optimizer shard size {} is invalid: use -1 (all replicas) or a positive size",
                self.opt_shard_size
            )));
        }
        if let Some(l) = &self.layers_per_stage {
            if l.len() != self.pp as usize {
                return Err(Error::Invalid(format!(
                    "layers per stage {l:?} gives {} stages but pp is {}",
                    l.len(),
                    self.pp
                )));
            }
        }
        Ok(())
    }
}

/// All settings of `reshard strategy new`, deserialisable from JSON for the C ABI
/// (`reshard_strategy_new(options_json, ...)`): `{"from", "dp", "mp", "pp", "optimizer_shard",
/// "opt_shard_size", "opt_shard_threshold_kb", "rules" (file), "rules_text", "preset",
/// "layers_per_stage", "out", "json"}`; only `from`, `dp`, `mp` and `out` are required.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewOptions {
    /// Complete checkpoint (see [`complete_checkpoint`]).
    pub from: PathBuf,
    /// Data-parallel size.
    pub dp: u32,
    /// Model-parallel size.
    pub mp: u32,
    /// Pipeline stages.
    #[serde(default = "default_pp")]
    pub pp: u32,
    /// Write optimizer-shard fields.
    #[serde(default)]
    pub optimizer_shard: bool,
    /// `optimizer_weight_shard_size` (-1 = all replicas).
    #[serde(default = "default_opt_size")]
    pub opt_shard_size: i32,
    /// `parallel_optimizer_threshold` in KB.
    #[serde(default = "default_threshold")]
    pub opt_shard_threshold_kb: u64,
    /// A rules file, tried before the preset.
    #[serde(default)]
    pub rules: Option<PathBuf>,
    /// Rules text, tried before the rules file.
    #[serde(default)]
    pub rules_text: Option<String>,
    /// Built-in rule set after the user rules (`llama`, `llama-vocab-dp`, or `none`).
    #[serde(default = "default_preset")]
    pub preset: String,
    /// Layers per stage instead of MindFormers' spreading.
    #[serde(default)]
    pub layers_per_stage: Option<Vec<u32>>,
    /// Output folder.
    pub out: PathBuf,
    /// Write JSON strategy files.
    #[serde(default)]
    pub json: bool,
}

pub(super) fn default_pp() -> u32 {
    1
}
pub(super) fn default_opt_size() -> i32 {
    -1
}
pub(super) fn default_threshold() -> u64 {
    64
}
pub(super) fn default_preset() -> String {
    "llama".into()
}

impl NewOptions {
    /// Parses the JSON form.
    pub fn from_json(text: &str) -> Result<NewOptions> {
        serde_json::from_str(text).map_err(|e| Error::Invalid(format!("bad strategy-new options: {e}")))
    }

    /// The rules: inline text, then the file, then the preset.
    pub fn rules(&self) -> Result<Rules> {
        let mut all = Rules::new();
        if let Some(t) = &self.rules_text {
            all.extend(Rules::parse(t, "rules_text", true)?);
        }
        if let Some(f) = &self.rules {
            let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, "read", e))?;
            all.extend(Rules::parse(&text, &f.display().to_string(), true)?);
        }
        if self.preset != "none" {
            all.extend(Rules::builtin(&self.preset)?);
        }
        Ok(all)
    }

    /// The layout to make.
    pub fn spec(&self) -> Result<StrategySpec> {
        let mut spec = StrategySpec::new(self.dp, self.mp, self.pp);
        spec.rules = self.rules()?;
        spec.optimizer_shard = self.optimizer_shard;
        spec.opt_shard_size = self.opt_shard_size;
        spec.opt_shard_threshold_kb = self.opt_shard_threshold_kb;
        spec.layers_per_stage = self.layers_per_stage.clone();
        Ok(spec)
    }

    /// Reads the checkpoint and writes the strategy files.
    pub fn run(&self) -> Result<Written> {
        let spec = self.spec()?;
        let params = read_params(&self.from)?;
        write(&spec, &params, &self.out, self.json)
    }
}

//! From a parameter's layout to the box each rank holds.
//!
//! MindSpore rewrites a layout before slicing: optimizer sharding splits dim 0 further over
//! replicated device axes (`_construct_tensor_layout_for_opt_shard` in `parallel/_tensor.py`),
//! and nested tensor maps split a dim over several axes (`_expand_layout`). Both turn the tensor
//! into a reshaped one with more dims. We follow the same construction, then fold the extra dims
//! back, so that every rank's slice is a box of the original tensor.

use crate::error::{Error, Result};
use crate::region::Region;
use crate::strategy::ParamLayout;

/// A layout after MindSpore's rewriting, ready to say which box a rank holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResolvedLayout {
    /// Device matrix after rewriting.
    dev: Vec<u64>,
    /// One entry per expanded dim: device axis from the right, or -1.
    map: Vec<i64>,
    /// Expanded dim sizes.
    sizes: Vec<u64>,
    /// Which original dim each expanded dim belongs to.
    owner: Vec<usize>,
    /// The original (full) tensor shape.
    full: Vec<u64>,
}

/// A pseudo-dim during construction: the device axes splitting it, its size, its original dim.
#[derive(Debug, Clone)]
struct PDim {
    axes: Vec<i64>,
    size: u64,
    owner: usize,
}

fn prod(v: &[u64]) -> u64 {
    v.iter().product()
}

/// `_get_tensor_strategy`: how many ways each tensor dim is split.
pub fn tensor_strategy(dev: &[u64], map: &[Vec<i64>]) -> Vec<u64> {
    let n = dev.len() as i64;
    map.iter()
        .map(|axes| axes.iter().filter(|&&a| a >= 0 && a < n).map(|&a| dev[(n - 1 - a) as usize]).product())
        .collect()
}

/// `opt_weight_shard_size` with -1 resolved (`_extract_layout_item`).
pub fn effective_opt_size(l: &ParamLayout) -> i64 {
    if l.opt_shard_size == -1 {
        let mp = prod(&tensor_strategy(&l.dev_matrix, &l.tensor_map)).max(1);
        (l.device_num() / mp) as i64
    } else {
        l.opt_shard_size
    }
}

/// The full tensor shape implied by a stored slice shape (MindSpore's `origin_tensor_shape`).
pub fn full_shape_from_slice(l: &ParamLayout, slice: &[u64]) -> Vec<u64> {
    let strat = tensor_strategy(&l.dev_matrix, &l.tensor_map);
    let opt = effective_opt_size(l);
    slice
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            // Saturating: an absurd result fails the shape checks instead of wrapping.
            let f = s.saturating_mul(strat.get(i).copied().unwrap_or(1));
            if i == 0 && opt > 0 {
                f.saturating_mul(opt as u64)
            } else {
                f
            }
        })
        .collect()
}

impl ResolvedLayout {
    /// The layout of an unsplit tensor.
    pub fn complete(full: &[u64]) -> ResolvedLayout {
        ResolvedLayout {
            dev: vec![1],
            map: vec![-1; full.len()],
            sizes: full.to_vec(),
            owner: (0..full.len()).collect(),
            full: full.to_vec(),
        }
    }

    /// Resolves `l` for a tensor of shape `full`. `what` names the parameter and file for errors.
    pub fn new(l: &ParamLayout, full: &[u64], param: &str, source: &std::path::Path) -> Result<ResolvedLayout> {
        let err = |detail: String| Error::BadLayout { path: source.to_path_buf(), param: param.to_string(), detail };
        if l.tensor_map.len() != full.len() {
            return Err(err(format!(
                "tensor_map {:?} has {} dims but the tensor has shape {:?}",
                l.tensor_map,
                l.tensor_map.len(),
                full
            )));
        }
        if l.nested && l.tensor_map.iter().any(|a| a.len() > 1 && a.contains(&-1)) {
            return Err(err(format!("nested tensor_map {:?} mixes -1 with device axes", l.tensor_map)));
        }
        let step = l.opt_shard_step;
        let size = effective_opt_size(l);
        let dev = l.dev_matrix.clone();
        let pdims: Vec<PDim> = l
            .tensor_map
            .iter()
            .zip(full)
            .enumerate()
            .map(|(i, (a, &s))| PDim { axes: a.clone(), size: s, owner: i })
            .collect();
        let (dev, pdims) = if step == 0 || size == 0 || full.is_empty() {
            (dev, pdims)
        } else {
            opt_shard(&dev, pdims, step, size, l.nested, full).map_err(err)?
        };
        // Expand nested entries: [a, b, c] -> dims of size dev[a], dev[b], rest / (dev[a]*dev[b]).
        let n = dev.len() as i64;
        let mut map = Vec::new();
        let mut sizes = Vec::new();
        let mut owner = Vec::new();
        for p in pdims {
            let mut accu = 1u64;
            for &a in &p.axes[..p.axes.len().saturating_sub(1)] {
                let d = dev[(n - 1 - a) as usize];
                map.push(a);
                sizes.push(d);
                owner.push(p.owner);
                accu *= d;
            }
            if p.size % accu != 0 {
                return Err(err(format!("dim of size {} cannot be split {} ways", p.size, accu)));
            }
            map.push(*p.axes.last().unwrap_or(&-1));
            sizes.push(p.size / accu);
            owner.push(p.owner);
        }
        for (j, &m) in map.iter().enumerate() {
            if m < -1 || m >= n {
                return Err(err(format!("device axis {m} outside dev_matrix {dev:?}")));
            }
            let split = if m == -1 { 1 } else { dev[(n - 1 - m) as usize] };
            if sizes[j] % split != 0 {
                return Err(err(format!(
                    "dim {} of shape {:?} cannot be split evenly {} ways (layout dev_matrix {:?}, tensor_map {:?}, \
                     opt shard size {})",
                    owner[j], full, split, l.dev_matrix, l.tensor_map, l.opt_shard_size
                )));
            }
        }
        Ok(ResolvedLayout { dev, map, sizes, owner, full: full.to_vec() })
    }

    /// Devices of the rewritten device matrix.
    pub fn device_num(&self) -> u64 {
        prod(&self.dev)
    }

    /// The full tensor shape.
    pub fn full_shape(&self) -> &[u64] {
        &self.full
    }

    /// The rewritten device matrix and, per original dim, the device axes (from the right,
    /// outermost first) that split it: the `Layout` form MindFormers writes, where optimizer
    /// sharding is folded into dim 0's axes.
    pub fn nested_map(&self) -> (Vec<u64>, Vec<Vec<i64>>) {
        let mut per_dim = vec![Vec::new(); self.full.len()];
        for (e, &m) in self.map.iter().enumerate() {
            if m >= 0 {
                if let Some(v) = self.owner.get(e).and_then(|&d| per_dim.get_mut(d)) {
                    v.push(m);
                }
            }
        }
        (self.dev.clone(), per_dim)
    }

    fn coords(&self, rank: u64) -> Vec<u64> {
        let mut r = rank % self.device_num().max(1);
        let mut c = vec![0; self.dev.len()];
        for i in (0..self.dev.len()).rev() {
            c[i] = r % self.dev[i];
            r /= self.dev[i];
        }
        c
    }

    fn rank_of(&self, coords: &[u64]) -> u64 {
        coords.iter().zip(&self.dev).fold(0, |acc, (&c, &d)| acc * d + c)
    }

    /// The box of the full tensor that `rank` holds (ranks beyond the device count wrap, as
    /// MindSpore's repeat axis does).
    pub fn rank_box(&self, rank: u64) -> Region {
        let c = self.coords(rank);
        let n = self.dev.len() as i64;
        let nd = self.full.len();
        let mut offset = vec![0u64; nd];
        let mut shape = vec![1u64; nd];
        // Fold the expanded dims of each original dim back, outermost first: a later dim that is
        // split narrows the range; an earlier one picks a block.
        let mut j = 0;
        for d in 0..nd {
            let mut off = 0u64;
            let mut len = 1u64;
            let mut block = 1u64; // size of the group dims after the current one
            let start = j;
            while j < self.owner.len() && self.owner[j] == d {
                j += 1;
            }
            for k in (start..j).rev() {
                let m = self.map[k];
                let split = if m == -1 { 1 } else { self.dev[(n - 1 - m) as usize] };
                let idx = if m == -1 { 0 } else { c[(n - 1 - m) as usize] };
                let part = self.sizes[k] / split;
                if len == block {
                    // Still contiguous: everything to the right was whole.
                    off += idx * part * block;
                    len = part * block;
                } else {
                    // A split to the right: only possible when this dim is picked (part == 1).
                    off += idx * part * block;
                    debug_assert!(part == 1, "non-contiguous slice");
                }
                block *= self.sizes[k];
            }
            offset[d] = off;
            shape[d] = len;
        }
        Region { offset, shape }
    }

    /// Among the ranks holding the same box as `holder`, the one whose coordinates on the
    /// unsplit (replica) axes equal those of `base`: MindSpore's choice, and it spreads reads
    /// over replicas.
    pub fn replica_near(&self, holder: u64, base: u64) -> u64 {
        let n = self.dev.len() as i64;
        let h = self.coords(holder);
        let mut c = self.coords(base);
        for &m in &self.map {
            if m >= 0 {
                let i = (n - 1 - m) as usize;
                c[i] = h[i];
            }
        }
        self.rank_of(&c)
    }
}

/// Port of `_construct_tensor_layout_for_opt_shard` (flat) and its `_by_layout` twin (nested).
fn opt_shard(
    dev: &[u64],
    pdims: Vec<PDim>,
    step: i64,
    size: i64,
    nested: bool,
    full: &[u64],
) -> Result<(Vec<u64>, Vec<PDim>), String> {
    let n = dev.len() as i64;
    let map: Vec<Vec<i64>> = pdims.iter().map(|p| p.axes.clone()).collect();
    let strategy = tensor_strategy(dev, &map);
    let sharded: Vec<usize> = map.iter().flatten().filter(|&&a| a >= 0).map(|&a| (n - 1 - a) as usize).collect();
    let repeated: Vec<usize> = (0..dev.len()).filter(|i| !sharded.contains(i) && dev[*i] > 1).collect();
    if repeated.is_empty() {
        return Err(format!(
            "dev_matrix {dev:?} and tensor_map {map:?} leave no replicated axis for optimizer sharding"
        ));
    }
    if strategy[0] == 0 || full[0] % strategy[0] != 0 {
        return Err(format!("dim 0 of shape {full:?} cannot be split {} ways", strategy[0]));
    }
    if !nested {
        if repeated.len() == 1 && prod(&dev[repeated[0] + 1..]) as i64 != step {
            return Err(format!(
                "opt_weight_shard_step {step} differs from the model-parallel size {} of dev_matrix {dev:?}",
                prod(&dev[repeated[0] + 1..])
            ));
        }
        let helper = (repeated.len() > 1 && repeated.len() < dev.len()) || repeated[0] > 0;
        if !helper {
            return Ok(special_branch(dev, pdims, &strategy, step, size, full));
        }
    }
    helper_branch(dev, pdims, &strategy, size, &repeated, full)
}

/// The branch of `_construct_tensor_layout_for_opt_shard` taken when the only replicated axes
/// start at the left: the device matrix becomes `[repeat, size] + strategy`.
fn special_branch(
    dev: &[u64],
    pdims: Vec<PDim>,
    strategy: &[u64],
    step: i64,
    size: i64,
    full: &[u64],
) -> (Vec<u64>, Vec<PDim>) {
    let ns = strategy.len() as i64;
    let mut new_dev: Vec<u64> = strategy.to_vec();
    let repeat = prod(dev) / (step as u64 * size as u64).max(1);
    let mut out = Vec::with_capacity(pdims.len() + 1);
    for (i, p) in pdims.into_iter().enumerate() {
        let axis = if strategy[i] == 1 { -1 } else { ns - 1 - i as i64 };
        if i == 0 {
            out.push(PDim { axes: vec![axis], size: strategy[0], owner: 0 });
            out.push(PDim { axes: vec![ns], size: full[0] / strategy[0], owner: 0 });
        } else {
            out.push(PDim { axes: vec![axis], size: p.size, owner: p.owner });
        }
    }
    new_dev.insert(0, size as u64);
    if repeat > 1 {
        new_dev.insert(0, repeat);
    }
    (new_dev, out)
}

/// `_construct_tensor_layout_helper`: split dim 0 over replicated axes taken from the right.
fn helper_branch(
    dev: &[u64],
    mut pdims: Vec<PDim>,
    strategy: &[u64],
    size: i64,
    repeated: &[usize],
    full: &[u64],
) -> Result<(Vec<u64>, Vec<PDim>), String> {
    let nd = dev.len();
    let mut new_dev = dev.to_vec();
    let mut new_dev_map: Vec<i64> = (0..nd as i64).collect();
    let mut opt_dims: Vec<usize> = Vec::new();
    let mut remained = if size == -1 { repeated.iter().map(|&i| dev[i]).product::<u64>() } else { size as u64 };
    for &dim in repeated.iter().rev() {
        let mut sz = dev[dim];
        if remained / sz == 0 {
            if sz % remained != 0 {
                return Err(format!(
                    "dev_matrix value {} at axis {} cannot be divided by the optimizer shard size {}",
                    dev[dim],
                    nd - dim - 1,
                    remained
                ));
            }
            sz = remained;
            new_dev[dim] = dev[dim] / sz;
            new_dev.insert(dim + 1, sz);
            for m in new_dev_map.iter_mut().skip(nd - dim - 1) {
                *m += 1;
            }
        }
        if remained % sz != 0 {
            return Err(format!(
                "optimizer shard size {remained} cannot be divided by {sz} (axis {} of dev_matrix {dev:?})",
                nd - dim - 1
            ));
        }
        remained /= sz;
        opt_dims.insert(0, dim);
        if remained == 1 {
            break;
        }
    }
    if remained != 1 {
        return Err(format!("optimizer shard size {size} exceeds the replicated devices of dev_matrix {dev:?}"));
    }
    if new_dev.len() != nd {
        for d in &mut opt_dims {
            *d += 1;
        }
        for p in &mut pdims {
            for a in &mut p.axes {
                if *a >= 0 {
                    *a = new_dev_map[*a as usize];
                }
            }
        }
    }
    let first = full[0] / strategy[0];
    let mut accu = 1u64;
    let nn = new_dev.len() as i64;
    let mut group = vec![PDim { axes: pdims[0].axes.clone(), size: strategy[0], owner: 0 }];
    for (i, &od) in opt_dims.iter().enumerate() {
        let axis = nn - od as i64 - 1;
        if i + 1 < opt_dims.len() {
            group.push(PDim { axes: vec![axis], size: new_dev[od], owner: 0 });
            accu *= new_dev[od];
        } else {
            if first % accu != 0 {
                return Err(format!("dim 0 of shape {full:?} cannot be split for optimizer sharding"));
            }
            group.push(PDim { axes: vec![axis], size: first / accu, owner: 0 });
        }
    }
    group.extend(pdims.into_iter().skip(1));
    Ok((new_dev, group))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn pl(dev: &[u64], map: &[i64], step: i64, size: i64) -> ParamLayout {
        ParamLayout {
            dev_matrix: dev.to_vec(),
            tensor_map: map.iter().map(|&m| vec![m]).collect(),
            nested: false,
            opt_shard_step: step,
            opt_shard_size: size,
            tensor_shape: None,
        }
    }

    fn boxes(l: &ParamLayout, full: &[u64]) -> Vec<(Vec<u64>, Vec<u64>)> {
        let r = ResolvedLayout::new(l, full, "p", Path::new("s")).unwrap();
        (0..l.device_num()).map(|k| r.rank_box(k)).map(|b| (b.offset, b.shape)).collect()
    }

    #[test]
    fn model_parallel_split_uses_rightmost_axis() {
        // dev [2 (dp), 2 (mp)], dim 0 split by axis 0 (mp): ranks 0,2 hold rows 0..4, 1,3 rows 4..8.
        let b = boxes(&pl(&[2, 2], &[0, -1], 0, 0), &[8, 4]);
        assert_eq!(b[0], (vec![0, 0], vec![4, 4]));
        assert_eq!(b[1], (vec![4, 0], vec![4, 4]));
        assert_eq!(b[2], b[0]);
        assert_eq!(b[3], b[1]);
    }

    #[test]
    fn optimizer_shard_splits_dim0_by_replica() {
        // dp2 mp2 with opt shard over dp: block = mp_idx * 2 + dp_idx, 2 rows each.
        let b = boxes(&pl(&[2, 2], &[0, -1], 2, -1), &[8, 4]);
        let rows: Vec<u64> = b.iter().map(|x| x.0[0]).collect();
        assert_eq!(rows, vec![0, 4, 2, 6]);
        assert!(b.iter().all(|x| x.1 == vec![2, 4]));
    }

    #[test]
    fn nested_map_splits_one_dim_over_two_axes() {
        let l = ParamLayout {
            dev_matrix: vec![2, 2, 2],
            tensor_map: vec![vec![2, 1], vec![-1]],
            nested: true,
            opt_shard_step: 0,
            opt_shard_size: 0,
            tensor_shape: None,
        };
        let b = boxes(&l, &[8, 2]);
        // rank = c2*4 + c1*2 + c0; row block = c2*2 + c1.
        for r in 0..8u64 {
            assert_eq!(b[r as usize].0[0], (r / 2) * 2, "rank {r}");
            assert_eq!(b[r as usize].1, vec![2, 2]);
        }
    }

    #[test]
    fn boxes_tile_the_tensor() {
        let l = pl(&[2, 2, 2], &[0, -1], 2, 2);
        let full = [16, 3];
        let r = ResolvedLayout::new(&l, &full, "p", Path::new("s")).unwrap();
        let mut covered = vec![0u32; 16];
        let mut seen = std::collections::HashSet::new();
        for k in 0..8 {
            let b = r.rank_box(k);
            if seen.insert(b.clone()) {
                for i in b.offset[0]..b.offset[0] + b.shape[0] {
                    covered[i as usize] += 1;
                }
            }
        }
        assert!(covered.iter().all(|&c| c == 1), "{covered:?}");
    }

    #[test]
    fn uneven_split_is_an_error_naming_the_parameter() {
        let err = ResolvedLayout::new(&pl(&[4], &[0], 0, 0), &[6], "model.w", Path::new("s.ckpt")).unwrap_err();
        assert!(err.to_string().contains("model.w") && err.to_string().contains("4 ways"), "{err}");
    }
}

//! Boxes in a tensor: an offset and a shape per dimension.

/// A box (hyper-rectangle) of a tensor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Region {
    /// First index on each dim.
    pub offset: Vec<u64>,
    /// Extent on each dim.
    pub shape: Vec<u64>,
}

impl Region {
    /// The whole of a tensor of `shape`.
    pub fn full(shape: &[u64]) -> Region {
        Region { offset: vec![0; shape.len()], shape: shape.to_vec() }
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The overlap with `other`, if any elements are shared.
    pub fn intersect(&self, other: &Region) -> Option<Region> {
        let mut offset = Vec::with_capacity(self.offset.len());
        let mut shape = Vec::with_capacity(self.offset.len());
        for d in 0..self.offset.len() {
            let lo = self.offset[d].max(other.offset[d]);
            let hi = (self.offset[d] + self.shape[d]).min(other.offset[d] + other.shape[d]);
            if hi <= lo {
                return None;
            }
            offset.push(lo);
            shape.push(hi - lo);
        }
        Some(Region { offset, shape })
    }

    /// Whether `other` lies inside `self`.
    pub fn contains(&self, other: &Region) -> bool {
        (0..self.offset.len()).all(|d| {
            other.offset[d] >= self.offset[d] && other.offset[d] + other.shape[d] <= self.offset[d] + self.shape[d]
        })
    }
}

/// Copies the box `extent` (given relative to both origins) from a C-order array of shape
/// `src_shape` to one of shape `dst_shape`; `elem` bytes per element. `read(offset, out)` fills
/// `out` with source bytes starting at `offset`, so the source may be split in segments.
#[allow(clippy::too_many_arguments)]
pub fn copy_box(
    read: &mut dyn FnMut(u64, &mut [u8]),
    src_shape: &[u64],
    src_origin: &[u64],
    dst: &mut [u8],
    dst_shape: &[u64],
    dst_origin: &[u64],
    extent: &[u64],
    elem: u64,
) {
    let nd = extent.len();
    if nd == 0 {
        read(0, &mut dst[..elem as usize]);
        return;
    }
    if extent.contains(&0) {
        return;
    }
    // Merge trailing dims that are whole in source and destination into one contiguous run.
    let mut run = elem;
    let mut k = nd; // dims k.. form the contiguous run
    while k > 0 {
        let d = k - 1;
        run *= extent[d];
        k -= 1;
        let whole = extent[d] == src_shape[d] && extent[d] == dst_shape[d];
        if !whole {
            break;
        }
    }
    let ss = strides(src_shape, elem);
    let ds = strides(dst_shape, elem);
    let mut idx = vec![0u64; k];
    loop {
        let mut so = 0;
        let mut doff = 0;
        for d in 0..nd {
            let i = if d < k { idx[d] } else { 0 };
            so += (src_origin[d] + i) * ss[d];
            doff += (dst_origin[d] + i) * ds[d];
        }
        read(so, &mut dst[doff as usize..(doff + run) as usize]);
        if !next_index(&mut idx, &extent[..k]) {
            return;
        }
    }
}

/// Strides of a C-order array of `shape` whose elements are `unit` apart (bytes or elements).
pub(crate) fn strides(shape: &[u64], unit: u64) -> Vec<u64> {
    let mut s = vec![unit; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Steps `idx` to the next index of a C-order array of shape `extent` (last dim fastest).
/// Returns false, leaving `idx` all zeros, after the last one.
pub(crate) fn next_index(idx: &mut [u64], extent: &[u64]) -> bool {
    for d in (0..idx.len()).rev() {
        idx[d] += 1;
        if idx[d] < extent[d] {
            return true;
        }
        idx[d] = 0;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intersect_boxes() {
        let a = Region { offset: vec![0, 0], shape: vec![4, 4] };
        let b = Region { offset: vec![2, 3], shape: vec![4, 4] };
        assert_eq!(a.intersect(&b), Some(Region { offset: vec![2, 3], shape: vec![2, 1] }));
        let c = Region { offset: vec![4, 0], shape: vec![1, 1] };
        assert_eq!(a.intersect(&c), None);
    }

    #[test]
    fn copy_box_matches_naive_indexing() {
        // src 3x4x5 of u16 values = linear index; copy box at (1,1,2) extent (2,2,3) into a
        // 4x3x3 destination at (2,0,0).
        let src: Vec<u8> = (0u16..60).flat_map(|v| v.to_le_bytes()).collect();
        let mut dst = vec![0u8; 4 * 3 * 3 * 2];
        let mut read = |off: u64, out: &mut [u8]| out.copy_from_slice(&src[off as usize..off as usize + out.len()]);
        copy_box(&mut read, &[3, 4, 5], &[1, 1, 2], &mut dst, &[4, 3, 3], &[2, 0, 0], &[2, 2, 3], 2);
        for i in 0..2u64 {
            for j in 0..2u64 {
                for l in 0..3u64 {
                    let s = ((1 + i) * 20 + (1 + j) * 5 + (2 + l)) as u16;
                    let d = (((2 + i) * 9 + j * 3 + l) * 2) as usize;
                    assert_eq!(u16::from_le_bytes([dst[d], dst[d + 1]]), s);
                }
            }
        }
    }
}

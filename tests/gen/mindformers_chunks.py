"""What make_mindformers.py and check_mindformers.py share: where a MindFormers ShardedTensor's
chunk lies in the full tensor."""


def chunk_slices(st):
    """The numpy slices of a ShardedTensor's chunk (global_offset = one slice index)."""
    (k,) = st.global_offset
    idx = []
    for f in reversed(st.axis_fragmentations):
        idx.append(k % f)
        k //= f
    idx.reverse()
    return tuple(slice(i * s, (i + 1) * s) for i, s in zip(idx, st.local_shape))

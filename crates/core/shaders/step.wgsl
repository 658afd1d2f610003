// Per-step values written once before each submit (prepended by the loader).
struct Step {
    // Tokens in this step (a prefill chunk, or one token of each sequence decoded); their
    // positions and cache rows are in the kernels' `positions` binding.
    n_tokens: u32,
    // First row whose logits are wanted (n_tokens - 1 when only the last position's are).
    logits_row0: u32,
    _pad0: u32,
    _pad1: u32,
}

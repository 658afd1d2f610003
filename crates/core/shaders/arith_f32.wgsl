// The matmul's arithmetic in f32 (the default; exact decoding, f32 products and sums). Its twin
// arith_f16.wgsl multiplies in f16; the loader prepends one of them after weights.wgsl.
//
// Arith4: a lane step's weights or activations; arith_* decode a step, the factor its dot takes
// (1 here: steps decode whole), and the dot itself.

alias Arith4 = vec4<f32>;

fn arith_x(v: vec4<f32>) -> Arith4 {
    return v;
}

fn arith_step(e: u32, r: u32, wi: u32) -> Arith4 {
    return weight_word(e, r, wi);
}

fn arith_word(word: u32, e: u32, r: u32, wi: u32) -> Arith4 {
    return decode_word(word, e, r, wi);
}

fn arith_scale(e: u32, r: u32, wi: u32) -> f32 {
    return 1.0;
}

fn arith_dot(w: Arith4, x: Arith4) -> f32 {
    return dot(w, x);
}

// The matmul's arithmetic in f16 (SHADER_F16 adapters, opt-in: GpuContext::f16_math): weights
// and activations as f16, a lane step's products and their sum of up to 4 in f16, that sum
// scaled and accumulated in f32. The loader puts `enable f16;` first and this after
// weights.wgsl; the lowering takes it for bf16, f16, FP8 and q8 only (f32 and q4 keep f32).
//
// (naga 30 does not take bitcast<vec2<f16>>(u32); the 16-bit patterns go through
// unpack2x16float, an exact round trip.)
// Weights convert exactly (f16 and FP8 bits, q8 codes, bf16 in f16's range); error comes from
// rounding x to f16 and each product and partial sum (~5 x 2^-11 of the step's sum of |w x|).
// FP8 steps are code / 256 and q8 steps code / 128 (|w| < 2), the rest of their scale applied in
// f32, so a step's sum overflows only past |x| ~ 16k; activations beyond f16's 65504 do not fit.

alias Arith4 = vec4<f16>;

fn arith_x(v: vec4<f32>) -> Arith4 {
    return vec4<f16>(v);
}

fn arith_step(e: u32, r: u32, wi: u32) -> Arith4 {
    if (FORMAT == FORMAT_Q4) {
        return vec4<f16>(weight_word(e, r, wi)); // not taken (q4 keeps f32)
    }
    return arith_word(weights[(e * wl.expert_stride + r * wl.cols + wi * ELEMS) / ELEMS], e, r, wi);
}

fn arith_word(word: u32, e: u32, r: u32, wi: u32) -> Arith4 {
    switch FORMAT {
        case FORMAT_F16: {
            return vec4<f16>(vec2<f16>(unpack2x16float(word)), 0.0h, 0.0h);
        }
        case FORMAT_FP8: {
            // fp8x4's shuffles, kept as f16: each code's value / 256 (exact, subnormals included).
            let b02 = word & 0x00ff00ffu;
            let b13 = (word >> 8u) & 0x00ff00ffu;
            let v02 = vec2<f16>(unpack2x16float(((b02 & 0x007f007fu) << 7u) | ((b02 & 0x00800080u) << 8u)));
            let v13 = vec2<f16>(unpack2x16float(((b13 & 0x007f007fu) << 7u) | ((b13 & 0x00800080u) << 8u)));
            let v = vec4<f16>(v02.x, v13.x, v02.y, v13.y);
            let nan = vec4<bool>((word & 0x7fu) == 0x7fu, ((word >> 8u) & 0x7fu) == 0x7fu, ((word >> 16u) & 0x7fu) == 0x7fu, ((word >> 24u) & 0x7fu) == 0x7fu);
            return select(v, vec4<f16>(f16(bitcast<f32>(0x7fc00000u))), nan);
        }
        case FORMAT_Q8: {
            let q = vec4<f32>(signed_byte(word, 0u), signed_byte(word, 8u), signed_byte(word, 16u), signed_byte(word, 24u));
            return vec4<f16>(q * 0.0078125);
        }
        default: {
            return vec4<f16>(decode_word(word, e, r, wi)); // bf16 (and f32, not taken)
        }
    }
}

// What a step's f16 dot is multiplied by: FP8's and q8's block scale times the codes' 2^8 or 2^7.
fn arith_scale(e: u32, r: u32, wi: u32) -> f32 {
    switch FORMAT {
        case FORMAT_FP8: {
            return 256.0 * scales[block_scale_index(e, r, wi * 4u)];
        }
        case FORMAT_Q8: {
            return 128.0 * scales[block_scale_index(e, r, wi * 4u)];
        }
        default: {
            return 1.0;
        }
    }
}

fn arith_dot(w: Arith4, x: Arith4) -> f32 {
    return f32(dot(w, x));
}

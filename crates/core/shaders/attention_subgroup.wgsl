// The split of attention_split.wgsl's `partial_split` for CPU adapters (lavapipe): each
// workgroup is one subgroup of SG lanes (the adapter's only subgroup size), so a score's sum
// across lanes is one subgroupAdd that every lane receives, and the kernel has no barrier and
// no workgroup memory. (llvmpipe runs a barrier as a switch between the workgroup's vectors of
// lanes, saving and restoring all they hold, which dominated the 64-lane kernel there.) Lanes own
// latent column pairs 2 (lane + SG j) and the next (one word of a 16-bit cache: llvmpipe's cost
// is per load); the online softmax runs per position, every lane computing the same values (one
// vector on a CPU). Writes the same (m, l, o) per (head, token, split) that `merge`
// combines. Needs the `subgroups` feature (the loader compiles this file only with it).

override LORA: u32;
override ROPE: u32;
// Heads per workgroup: HG * ceil((LORA + ROPE) / 2 SG) <= 80 query pairs per lane, and
// HG * ceil(LORA / 2 SG) <= 64 output pairs.
override HG: u32;
override SG: u32;


// The query's pair at columns c, c + 1 (q_lat below LORA, q_pe after; 0 past the row).
fn query_pair(head: u32, c: u32) -> vec2<f32> {
    var v = vec2<f32>(0.0);
    for (var k = 0u; k < 2u; k++) {
        let ck = c + k;
        if (ck < LORA) {
            v[k] = q_lat[head * LORA + ck];
        } else if (ck < LORA + ROPE) {
            v[k] = q[head * p.qk + p.nope + (ck - LORA)];
        }
    }
    return v;
}

@compute @workgroup_size(SG)
fn partial_subgroup(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let latent = LORA + ROPE;
    let cpl = (latent + 2u * SG - 1u) / (2u * SG);
    let lora_cpl = (LORA + 2u * SG - 1u) / (2u * SG);
    let h0 = wid.x * HG;
    let t = wid.y;
    let split = wid.z;
    let begin = split * p.chunk;
    let end = min(begin + p.chunk, attended(t));

    var qs: array<vec2<f32>, 80>; // HG x cpl
    for (var hh = 0u; hh < HG; hh++) {
        let head = t * p.heads + min(h0 + hh, p.heads - 1u);
        for (var j = 0u; j < cpl; j++) {
            qs[hh * cpl + j] = query_pair(head, 2u * (lane + SG * j));
        }
    }
    var o: array<vec2<f32>, 64>; // HG x lora_cpl
    for (var i = 0u; i < HG * lora_cpl; i++) {
        o[i] = vec2<f32>(0.0);
    }
    var m: array<f32, 8>;
    var l: array<f32, 8>;
    for (var hh = 0u; hh < HG; hh++) {
        m[hh] = -3.4e38;
        l[hh] = 0.0;
    }
    for (var pos = begin; pos < end; pos++) {
        var row: array<vec2<f32>, 40>; // cpl
        let first = attended_row(t, pos) * latent;
        for (var j = 0u; j < cpl; j++) {
            let c = 2u * (lane + SG * j);
            // A pair past the row reads as zero; an odd row's last pair has one value.
            var v = vec2<f32>(0.0);
            if (c + 1u < latent) {
                v = cache_pair(first + c);
            } else if (c < latent) {
                v.x = cache_at(first + c);
            }
            row[j] = v;
        }
        for (var hh = 0u; hh < HG; hh++) {
            var d = 0.0;
            for (var j = 0u; j < cpl; j++) {
                d += dot(qs[hh * cpl + j], row[j]);
            }
            let s = subgroupAdd(d) * p.scale;
            let top = max(m[hh], s);
            let a = exp(m[hh] - top);
            let e = exp(s - top);
            l[hh] = l[hh] * a + e;
            m[hh] = top;
            for (var j = 0u; j < lora_cpl; j++) {
                o[hh * lora_cpl + j] = o[hh * lora_cpl + j] * a + e * row[j];
            }
        }
    }
    for (var hh = 0u; hh < HG; hh++) {
        let h = h0 + hh;
        if (h >= p.heads) {
            break;
        }
        let out = ((t * p.heads + h) * p.splits + split) * (2u + LORA);
        if (lane == 0u) {
            split_out[out] = m[hh];
            split_out[out + 1u] = l[hh];
        }
        for (var j = 0u; j < lora_cpl; j++) {
            let c = 2u * (lane + SG * j);
            for (var k = 0u; k < 2u; k++) {
                if (c + k < LORA) {
                    split_out[out + 2u + c + k] = o[hh * lora_cpl + j][k];
                }
            }
        }
    }
}

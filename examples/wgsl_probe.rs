//! Times a WGSL snippet on the default adapter: `cargo run --release --example wgsl_probe FILE [GROUPS]`.
//! The snippet gets `buf: array<f32>` (1M floats, read_write) at binding 0 and runs `main`.
use std::time::Instant;
use wgpu::util::DeviceExt;

fn main() {
    let path = std::env::args().nth(1).expect("wgsl file");
    let groups: u32 = std::env::args().nth(2).map_or(1, |g| g.parse().unwrap());
    let src = std::fs::read_to_string(path).unwrap();
    let src_has_uniform = src.contains("binding(1)");
    let ctx = dsrun::backend::wgpu::context::open(dsrun::device::GpuChoice::Auto).unwrap();
    let module = ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor { label: None, source: wgpu::ShaderSource::Wgsl(src.into()) });
    let pipeline = ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let data: Vec<f32> = (0..1 << 20).map(|i| (i % 97) as f32 * 0.01).collect();
    let buf = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: bytemuck::cast_slice(&data), usage: wgpu::BufferUsages::STORAGE });
    let uni = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&[16u32, 2, 4, 2, 0, 2, 1, 1, 0x40200000, 0, 0, 0]),
        usage: wgpu::BufferUsages::UNIFORM,
    });
    let with_uniform = src_has_uniform;
    fn entries_for<'a>(b: &'a wgpu::Buffer, uni: &'a wgpu::Buffer, with_uniform: bool) -> Vec<wgpu::BindGroupEntry<'a>> {
        let mut e = vec![wgpu::BindGroupEntry { binding: 0, resource: b.as_entire_binding() }];
        if with_uniform {
            e.push(wgpu::BindGroupEntry { binding: 1, resource: uni.as_entire_binding() });
        }
        e
    }
    let entries = |b| entries_for(b, &uni, with_uniform);
    let buf2 = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: bytemuck::cast_slice(&data), usage: wgpu::BufferUsages::STORAGE });
    let bg2 = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipeline.get_bind_group_layout(0), entries: &entries(&buf2) });
    let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipeline.get_bind_group_layout(0), entries: &entries(&buf) });
    for round in 0..6 {
        let bg = if round % 2 == 0 { &bg } else { &bg2 };
        let t = Instant::now();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut p = enc.begin_compute_pass(&Default::default());
            p.set_pipeline(&pipeline);
            p.set_bind_group(0, bg, &[]);
            p.dispatch_workgroups(groups, 1, 1);
        }
        ctx.queue.submit([enc.finish()]);
        ctx.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None }).unwrap();
        println!("round {round}: {:.3} ms", t.elapsed().as_secs_f64() * 1e3);
    }
}

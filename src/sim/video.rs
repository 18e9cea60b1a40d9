//! A tiny, real H.264-in-MP4 writer for SaveVideo.
//!
//! Every frame is one IDR picture made only of I_PCM macroblocks (raw YUV 4:2:0
//! samples), the simplest stream any H.264 decoder accepts: no transform, no
//! entropy coding, a few hundred lines instead of an encoder dependency. Frames
//! are cropped to whole 16×16 macroblocks.

use super::pixels::Frame;

struct Bits {
    out: Vec<u8>,
    cur: u8,
    used: u8,
}

impl Bits {
    fn new() -> Self {
        Self {
            out: Vec::new(),
            cur: 0,
            used: 0,
        }
    }

    fn bit(&mut self, b: bool) {
        self.cur = (self.cur << 1) | u8::from(b);
        self.used += 1;
        if self.used == 8 {
            self.out.push(self.cur);
            self.cur = 0;
            self.used = 0;
        }
    }

    fn u(&mut self, n: u32, v: u32) {
        for i in (0..n).rev() {
            self.bit((v >> i) & 1 == 1);
        }
    }

    /// Exp-Golomb `ue(v)`.
    fn ue(&mut self, v: u32) {
        let x = v + 1;
        let len = 32 - x.leading_zeros();
        self.u(len - 1, 0);
        self.u(len, x);
    }

    fn se(&mut self, v: i32) {
        let m = if v > 0 {
            2 * v as u32 - 1
        } else {
            (-2 * v) as u32
        };
        self.ue(m);
    }

    fn align_zero(&mut self) {
        while self.used != 0 {
            self.bit(false);
        }
    }

    fn byte(&mut self, b: u8) {
        if self.used == 0 {
            self.out.push(b);
        } else {
            self.u(8, b as u32);
        }
    }

    /// `rbsp_trailing_bits`.
    fn finish(mut self) -> Vec<u8> {
        self.bit(true);
        self.align_zero();
        self.out
    }
}

/// NAL unit with header byte and emulation prevention.
fn nal(header: u8, rbsp: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rbsp.len() + rbsp.len() / 64 + 1);
    out.push(header);
    let mut zeros = 0;
    for &b in rbsp {
        if zeros >= 2 && b <= 3 {
            out.push(3);
            zeros = 0;
        }
        out.push(b);
        zeros = if b == 0 { zeros + 1 } else { 0 };
    }
    out
}

fn sps(mbs_w: u32, mbs_h: u32) -> Vec<u8> {
    let mut b = Bits::new();
    b.u(8, 66); // baseline
    b.u(8, 0xC0); // constraint_set0 + constraint_set1
    b.u(8, 30); // level 3.0
    b.ue(0); // seq_parameter_set_id
    b.ue(0); // log2_max_frame_num_minus4
    b.ue(2); // pic_order_cnt_type: output order = decode order
    b.ue(1); // max_num_ref_frames
    b.bit(false); // gaps_in_frame_num_value_allowed_flag
    b.ue(mbs_w - 1);
    b.ue(mbs_h - 1);
    b.bit(true); // frame_mbs_only_flag
    b.bit(true); // direct_8x8_inference_flag
    b.bit(false); // frame_cropping_flag
    b.bit(false); // vui_parameters_present_flag
    nal(0x67, &b.finish())
}

fn pps() -> Vec<u8> {
    let mut b = Bits::new();
    b.ue(0); // pic_parameter_set_id
    b.ue(0); // seq_parameter_set_id
    b.bit(false); // entropy_coding_mode_flag: CAVLC
    b.bit(false); // bottom_field_pic_order_in_frame_present_flag
    b.ue(0); // num_slice_groups_minus1
    b.ue(0);
    b.ue(0);
    b.bit(false); // weighted_pred_flag
    b.u(2, 0); // weighted_bipred_idc
    b.se(0); // pic_init_qp_minus26
    b.se(0); // pic_init_qs_minus26
    b.se(0); // chroma_qp_index_offset
    b.bit(true); // deblocking_filter_control_present_flag
    b.bit(false); // constrained_intra_pred_flag
    b.bit(false); // redundant_pic_cnt_present_flag
    nal(0x68, &b.finish())
}

fn yuv(p: &[u8]) -> (f64, f64, f64) {
    let (r, g, b) = (p[0] as f64, p[1] as f64, p[2] as f64);
    (
        16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0,
        128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0,
        128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0,
    )
}

fn idr_slice(frame: &Frame, mbs_w: u32, mbs_h: u32, idr_id: u32) -> Vec<u8> {
    let mut b = Bits::new();
    b.ue(0); // first_mb_in_slice
    b.ue(7); // slice_type: I (all slices)
    b.ue(0); // pic_parameter_set_id
    b.u(4, 0); // frame_num
    b.ue(idr_id % 2); // idr_pic_id: consecutive IDRs must differ
    b.bit(false); // no_output_of_prior_pics_flag
    b.bit(false); // long_term_reference_flag
    b.se(0); // slice_qp_delta
    b.ue(1); // disable_deblocking_filter_idc
    let px = |x: u32, y: u32| {
        let i = ((y.min(frame.height - 1) * frame.width + x.min(frame.width - 1)) * 3) as usize;
        yuv(&frame.rgb[i..i + 3])
    };
    for my in 0..mbs_h {
        for mx in 0..mbs_w {
            b.ue(25); // mb_type: I_PCM
            b.align_zero();
            for y in 0..16 {
                for x in 0..16 {
                    b.byte(px(mx * 16 + x, my * 16 + y).0.round().clamp(1.0, 254.0) as u8);
                }
            }
            for plane in 0..2 {
                for y in 0..8 {
                    for x in 0..8 {
                        let mut sum = 0.0;
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            let (_, u, v) = px(mx * 16 + x * 2 + dx, my * 16 + y * 2 + dy);
                            sum += if plane == 0 { u } else { v };
                        }
                        b.byte((sum / 4.0).round().clamp(1.0, 254.0) as u8);
                    }
                }
            }
        }
    }
    nal(0x65, &b.finish())
}

fn boxed(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(body);
    out
}

fn full(kind: &[u8; 4], version_flags: u32, body: &[u8]) -> Vec<u8> {
    let mut b = version_flags.to_be_bytes().to_vec();
    b.extend_from_slice(body);
    boxed(kind, &b)
}

fn be32(vals: &[u32]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_be_bytes()).collect()
}

const MATRIX: [u32; 9] = [0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x4000_0000];

/// An MP4 (ISO BMFF, `avc1`) holding `frames` at `fps`.
pub fn encode_mp4(frames: &[Frame], fps: f64) -> Vec<u8> {
    let first = frames
        .first()
        .cloned()
        .unwrap_or_else(|| Frame::solid(16, 16, [0, 0, 0]));
    let (mbs_w, mbs_h) = ((first.width / 16).max(1), (first.height / 16).max(1));
    let (w, h) = (mbs_w * 16, mbs_h * 16);
    let sps = sps(mbs_w, mbs_h);
    let pps = pps();
    let mut samples: Vec<Vec<u8>> = Vec::new();
    for (i, f) in frames
        .iter()
        .chain(frames.is_empty().then_some(&first))
        .enumerate()
    {
        let slice = idr_slice(f, mbs_w, mbs_h, i as u32);
        let mut s = (slice.len() as u32).to_be_bytes().to_vec();
        s.extend_from_slice(&slice);
        samples.push(s);
    }
    let n = samples.len() as u32;
    let timescale = ((fps.clamp(0.01, 1000.0) * 1000.0).round() as u32).max(1);
    let delta = 1000u32;
    let media_duration = n * delta;
    let movie_duration = (media_duration as u64 * 1000 / timescale as u64) as u32;

    let ftyp = boxed(
        b"ftyp",
        &[
            b"isom".as_slice(),
            &512u32.to_be_bytes(),
            b"isom",
            b"iso2",
            b"avc1",
            b"mp41",
        ]
        .concat(),
    );
    let mdat_body: Vec<u8> = samples.concat();
    let mdat = boxed(b"mdat", &mdat_body);
    let chunk_offset = (ftyp.len() + 8) as u32;

    let mut mvhd = be32(&[0, 0, 1000, movie_duration, 0x10000]);
    mvhd.extend_from_slice(&[0x01, 0x00, 0, 0]);
    mvhd.extend_from_slice(&[0; 8]);
    mvhd.extend(be32(&MATRIX));
    mvhd.extend(be32(&[0; 6]));
    mvhd.extend(be32(&[2]));
    let mvhd = full(b"mvhd", 0, &mvhd);

    let mut tkhd = be32(&[0, 0, 1, 0, movie_duration, 0, 0]);
    tkhd.extend_from_slice(&[0; 8]); // layer, alternate_group, volume, reserved
    tkhd.extend(be32(&MATRIX));
    tkhd.extend(be32(&[w << 16, h << 16]));
    let tkhd = full(b"tkhd", 3, &tkhd);

    let mut mdhd = be32(&[0, 0, timescale, media_duration]);
    mdhd.extend_from_slice(&[0x55, 0xC4, 0, 0]); // language "und"
    let mdhd = full(b"mdhd", 0, &mdhd);
    let hdlr = full(
        b"hdlr",
        0,
        &[be32(&[0]).as_slice(), b"vide", &[0; 12], b"VideoHandler\0"].concat(),
    );

    let mut avcc = vec![1, 66, 0xC0, 30, 0xFF, 0xE1];
    avcc.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    avcc.extend_from_slice(&sps);
    avcc.push(1);
    avcc.extend_from_slice(&(pps.len() as u16).to_be_bytes());
    avcc.extend_from_slice(&pps);
    let mut avc1 = vec![0; 6];
    avc1.extend_from_slice(&1u16.to_be_bytes());
    avc1.extend_from_slice(&[0; 16]);
    avc1.extend_from_slice(&(w as u16).to_be_bytes());
    avc1.extend_from_slice(&(h as u16).to_be_bytes());
    avc1.extend(be32(&[0x0048_0000, 0x0048_0000, 0]));
    avc1.extend_from_slice(&1u16.to_be_bytes());
    let mut name = [0u8; 32];
    let label = b"comfyfleet sim";
    name[0] = label.len() as u8;
    name[1..=label.len()].copy_from_slice(label);
    avc1.extend_from_slice(&name);
    avc1.extend_from_slice(&[0x00, 0x18, 0xFF, 0xFF]);
    avc1.extend(boxed(b"avcC", &avcc));
    let stsd = full(b"stsd", 0, &[be32(&[1]), boxed(b"avc1", &avc1)].concat());
    let stts = full(b"stts", 0, &be32(&[1, n, delta]));
    let stsc = full(b"stsc", 0, &be32(&[1, 1, n, 1]));
    let mut stsz = be32(&[0, n]);
    stsz.extend(samples.iter().flat_map(|s| (s.len() as u32).to_be_bytes()));
    let stsz = full(b"stsz", 0, &stsz);
    let stco = full(b"stco", 0, &be32(&[1, chunk_offset]));
    let stbl = boxed(b"stbl", &[stsd, stts, stsc, stsz, stco].concat());
    let dref = full(b"dref", 0, &[be32(&[1]), full(b"url ", 1, &[])].concat());
    let minf = boxed(
        b"minf",
        &[full(b"vmhd", 1, &[0; 8]), boxed(b"dinf", &dref), stbl].concat(),
    );
    let mdia = boxed(b"mdia", &[mdhd, hdlr, minf].concat());
    let trak = boxed(b"trak", &[tkhd, mdia].concat());
    let moov = boxed(b"moov", &[mvhd, trak].concat());
    [ftyp, mdat, moov].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_golomb() {
        let mut b = Bits::new();
        b.ue(0); // 1
        b.ue(25); // 000011010
        assert_eq!(b.finish(), vec![0b1000_0110, 0b1010_0000]);
    }

    #[test]
    fn mp4_has_the_boxes_players_need() {
        let frames = vec![Frame::solid(40, 24, [255, 0, 0]); 3];
        let mp4 = encode_mp4(&frames, 16.0);
        assert_eq!(&mp4[4..8], b"ftyp");
        for tag in [b"mdat", b"moov", b"avcC", b"stsz", b"stco"] {
            assert!(mp4.windows(4).any(|w| w == tag), "missing {:?}", tag);
        }
        let ftyp_len = u32::from_be_bytes([mp4[0], mp4[1], mp4[2], mp4[3]]) as usize;
        let mdat_len = u32::from_be_bytes([
            mp4[ftyp_len],
            mp4[ftyp_len + 1],
            mp4[ftyp_len + 2],
            mp4[ftyp_len + 3],
        ]);
        // 2×1 macroblocks of 384 PCM bytes per frame, plus headers.
        assert!(mdat_len as usize > 3 * 2 * 384);
    }
}

"""Writes the hostile and unusual images the edge checks are tested with (tests/fixtures/images/).

Needs Pillow (`pip install pillow==11.3.0`); not needed by CI, which uses the committed files.
Deterministic: the same Pillow version writes the same bytes.

- cmyk.jpg       a CMYK JPEG (Adobe-style, as print workflows export)
- gray.jpg       an 8-bit grayscale JPEG
- progressive.jpg a progressive RGB JPEG
- rgb16.png      a 16-bit-per-channel RGB PNG
- gray16.png     a 16-bit grayscale PNG
- rgba.png       a PNG with an alpha channel
- animated.gif   a three-frame animated GIF
- bomb.png       a valid 12000x12000 grayscale PNG of zeros: 144 MB of pixels in ~140 KB
                 (a decompression bomb; refused from its header)
- wide.png       a valid 20000x1 PNG (over the per-side limit, tiny in pixels)
- truncated.jpg  gray.jpg cut in half
- corrupt.png    rgba.png with bytes flipped in its IDAT chunk (the CRC no longer matches)
"""

import io
import struct
import sys
import zlib
from pathlib import Path

from PIL import Image

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tests/fixtures/images")
out.mkdir(parents=True, exist_ok=True)


def gradient(mode, w, h):
    img = Image.new("RGB", (w, h))
    img.putdata([((x * 7) % 256, (y * 11) % 256, ((x + y) * 5) % 256) for y in range(h) for x in range(w)])
    return img.convert(mode)


def save(img, name, **kw):
    buf = io.BytesIO()
    img.save(buf, **kw)
    (out / name).write_bytes(buf.getvalue())
    return buf.getvalue()


save(gradient("CMYK", 33, 21), "cmyk.jpg", format="JPEG", quality=90)
gray = save(gradient("L", 37, 29), "gray.jpg", format="JPEG", quality=90)
save(gradient("RGB", 41, 23), "progressive.jpg", format="JPEG", quality=85, progressive=True)
save(Image.new("I;16", (19, 13), 40000), "gray16.png", format="PNG")
rgba = save(gradient("RGBA", 17, 11), "rgba.png", format="PNG")
frames = [gradient("RGB", 16, 16).rotate(90 * i) for i in range(3)]
save(frames[0], "animated.gif", format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def png(w, h, color_type, bit_depth, rows):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# 16-bit RGB: Pillow cannot write it, so by hand (filter byte 0 + big-endian samples per row).
w, h = 9, 7
raw = b"".join(b"\x00" + b"".join(struct.pack(">HHH", x * 7000, y * 9000, 65535 - x * 3000) for x in range(w)) for y in range(h))
(out / "rgb16.png").write_bytes(png(w, h, 2, 16, zlib.compress(raw, 9)))

# The bomb: compress row by row so this script never holds 400 MB.
side = 12000
z = zlib.compressobj(9)
row = b"\x00" * (side + 1)
body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
(out / "bomb.png").write_bytes(png(side, side, 0, 8, body))
(out / "wide.png").write_bytes(png(20000, 1, 0, 8, zlib.compress(b"\x00" * 20001, 9)))

(out / "truncated.jpg").write_bytes(gray[: len(gray) // 2])
bad = bytearray(rgba)
idat = bad.index(b"IDAT")
for i in range(idat + 8, idat + 24):
    bad[i] ^= 0x5A
(out / "corrupt.png").write_bytes(bytes(bad))

for p in sorted(out.iterdir()):
    print(f"{p.name:16} {p.stat().st_size:>8} bytes")

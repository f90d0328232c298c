"""Pictures for people: PIL composites of images side by side, and the matplotlib figures of `explain`,
`ablate` and the benchmark report."""

from __future__ import annotations


def side_by_side(left, right, caption: str, labels=("original", "attnreg")):
    """Two images next to each other with labels above and `caption` written under them."""
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, 256 // max(left.width, 1))
    left, right = (im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in (left, right))
    font = ImageFont.load_default()
    lines = _wrap(caption, max(20, (left.width + right.width) // 7))
    pad, line_h = 8, 14
    canvas = Image.new("RGB", (left.width + right.width + 3 * pad, left.height + 2 * pad + line_h * (len(lines) + 1)), "white")
    canvas.paste(left, (pad, pad + line_h))
    canvas.paste(right, (2 * pad + left.width, pad + line_h))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), labels[0], fill="black", font=font)
    draw.text((2 * pad + left.width, 2), labels[1], fill="black", font=font)
    for i, line in enumerate(lines):
        draw.text((pad, 2 * pad + line_h + left.height + i * line_h), line, fill="black", font=font)
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines

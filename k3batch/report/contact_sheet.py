"""The contact sheet of a report: each sample's thumbnail above its caption (the prompt, tidied
by `beautify`), in a grid drawn with Pillow; and the thumbnails as the page embeds them."""

import base64
import io
import math

# Contact sheet layout: each cell is the thumbnail (fitted in a THUMB x THUMB box) above a
# caption of up to CAPTION_LINES lines, with PAD pixels around both.
PAD = 8
FONT_SIZE = 13
LINE_HEIGHT = 16
CAPTION_LINES = 3
CAPTION_HEIGHT = CAPTION_LINES * LINE_HEIGHT + PAD
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (30, 30, 30)


def beautify(prompt: str | None, max_chars: int | None = None) -> str:
    """A prompt as a caption: whitespace collapsed, wrapping quotes dropped, first letter upper."""
    text = " ".join((prompt or "").split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if text[:1].islower():
        text = text[0].upper() + text[1:]
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "\u2026"
    return text


def _font(size: int):
    from PIL import ImageFont

    # DejaVu covers Cyrillic and more when the system has it; Pillow's own font otherwise.
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last kept line ends with an ellipsis if cut."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while draw.textlength(current, font=font) > width:  # a word longer than a line
            cut = len(current)
            while cut > 1 and draw.textlength(current[:cut], font=font) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "\u2026", font=font) > width:
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last.rstrip() + "\u2026"]
    return lines


def contact_sheet_size(n: int, columns: int, thumb: int) -> tuple[int, int]:
    """(width, height) in pixels of the sheet for `n` samples."""
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    return cols * (thumb + 2 * PAD), rows * (thumb + CAPTION_HEIGHT + 2 * PAD)


def thumbnail(data: bytes, thumb: int):
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        # Fitted to the box both ways: small images (the demo's 128 px) are scaled up too.
        return ImageOps.contain(image.convert("RGB"), (thumb, thumb))


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def draw_contact_sheet(samples: list, thumbs: list, columns: int, thumb: int):
    """The grid: each thumbnail centred in its cell, its caption below it."""
    from PIL import Image, ImageDraw

    size = contact_sheet_size(len(samples), columns, thumb)
    sheet = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(FONT_SIZE)
    cols = max(1, min(columns, len(samples)))
    for i, (sample, image) in enumerate(zip(samples, thumbs, strict=True)):
        x0 = (i % cols) * (thumb + 2 * PAD) + PAD
        y0 = (i // cols) * (thumb + CAPTION_HEIGHT + 2 * PAD) + PAD
        sheet.paste(image, (x0 + (thumb - image.width) // 2, y0 + (thumb - image.height) // 2))
        for j, line in enumerate(_wrap(draw, sample.caption, font, thumb, CAPTION_LINES)):
            draw.text(
                (x0, y0 + thumb + PAD // 2 + j * LINE_HEIGHT), line, fill=TEXT_COLOUR, font=font
            )
    return sheet

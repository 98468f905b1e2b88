"""Reads the sample figures back out of a report page."""

from html.parser import HTMLParser


class Links(HTMLParser):
    """The sample figures of the page: data-id, link target, thumbnail, caption text."""

    def __init__(self):
        super().__init__()
        self.figures: list[dict] = []
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figures.append({"id": attrs["data-id"], "caption": ""})
        elif self.figures and tag == "a" and "href" not in self.figures[-1]:
            self.figures[-1]["href"] = attrs["href"]
        elif self.figures and tag == "img" and "src" not in self.figures[-1]:
            self.figures[-1]["src"] = attrs["src"]
        elif tag == "figcaption":
            self._in_caption = True
        elif tag == "span":
            self._in_caption = False

    def handle_data(self, data):
        if self._in_caption:
            self.figures[-1]["caption"] += data

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._in_caption = False


def figures(page: str) -> list[dict]:
    parser = Links()
    parser.feed(page)
    return parser.figures

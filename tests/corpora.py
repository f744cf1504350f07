"""Generated corpora for the tests: no test downloads data."""
import random


def make_corpus(n_bytes: int, seed: int = 0) -> bytes:
    """Wiki-like text with real structure (so a model can learn it) from a small vocabulary of words."""
    rng = random.Random(seed)
    words = ["the", "of", "and", "history", "science", "river", "city", "war", "music", "théâtre", "1984",
             "language", "king", "film", "school", "church", "[[link]]", "{{cite}}", "&amp;", "naïve"]
    out, size = [], 0
    while size < n_bytes:
        title = " ".join(rng.choice(words) for _ in range(2)).title()
        body = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        page = f"<page>\n<title>{title}</title>\n<text>{body}.\n</text>\n</page>\n"
        out.append(page)
        size += len(page.encode())
    return "".join(out).encode()[:n_bytes]


# Hand-written sentences per topic: each page draws from one topic only, so its category is known.
TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "Science": (["Electron", "Quantum mechanics", "Acid", "Galaxy", "Photosynthesis"], [
        "The physicist measured the energy of each electron in the laboratory.",
        "Quantum theory predicts how atoms and molecules absorb light.",
        "Chemists studied the reaction of an acid with a metal compound.",
        "The experiment confirmed the hypothesis about gravity and mass.",
        "Biologists classify every species of plant by its genes and cells.",
        "Astronomers observed the orbit of the planet around its star.",
    ]),
    "Sports and Recreation": (["Association football", "Wimbledon", "Tour de France", "Cricket"], [
        "The football team scored three goals in the championship match.",
        "Fans filled the stadium to watch the final of the league season.",
        "The coach praised each player after the tournament victory.",
        "She won a gold medal in swimming at the Olympic Games.",
        "The cricket club finished the season at the top of the league.",
        "Tennis and golf players trained hard for the next cup.",
    ]),
    "Military and Warfare": (["Battle of Hastings", "Siege of Leningrad", "Artillery", "Submarine"], [
        "The army advanced with infantry and artillery before the battle.",
        "Soldiers of the regiment defended the fortress during the siege.",
        "The navy sent a fleet of warships and submarines to the coast.",
        "Casualties were heavy as the troops fought through the offensive.",
        "The commander ordered the cavalry to attack the enemy flank.",
        "Bombers and fighter aircraft supported the invasion.",
    ]),
    "Religion and Philosophy": (["Immanuel Kant", "Buddhism", "Monastery", "Ethics"], [
        "The church taught that God created the soul and the world.",
        "Philosophers such as Plato and Kant wrote on ethics and reason.",
        "Monks gathered in the temple for prayer and worship.",
        "The bishop and the pope discussed the doctrine of the faith.",
        "Buddhist and Hindu traditions describe the spiritual path.",
        "Metaphysics asks what existence and knowledge really are.",
    ]),
}
HEADER = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/" version="0.3" xml:lang="en">\n'
          "  <siteinfo>\n    <sitename>Wikipedia</sitename>\n    <generator>MediaWiki 1.6alpha</generator>\n"
          '    <namespaces>\n      <namespace key="-2">Media</namespace>\n    </namespaces>\n  </siteinfo>\n')
FOOTER = "</mediawiki>\n"


def page(title: str, sentences: list[str], page_id: int) -> str:
    paragraphs = "\n\n".join(" ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3))
    return (f"  <page>\n    <title>{title}</title>\n    <id>{page_id}</id>\n    <revision>\n"
            f"      <text xml:space=\"preserve\">'''{title}''' is a [[topic]].\n{paragraphs}\n"
            f"[[Category:{title}]]</text>\n    </revision>\n  </page>\n")


THREE_TOPICS = ["Science", "Sports and Recreation", "Military and Warfare"]  # topic_dataset's categories


def make_topic_corpus(n_pages: int = 120, topics: list[str] | None = None, seed: int = 0) -> tuple[bytes, dict]:
    """An enwik8-like dump (header, pages, footer) whose pages cycle through the topics; also {title: topic}."""
    rng = random.Random(seed)
    topics = topics or list(TOPICS)
    pages, truth = [], {}
    for i in range(n_pages):
        topic = topics[i % len(topics)]
        titles, sentences = TOPICS[topic]
        title = f"{rng.choice(titles)} {i}"
        truth[title] = topic
        pages.append(page(title, [rng.choice(sentences) for _ in range(rng.randint(4, 9))], i))
    return (HEADER + "".join(pages) + FOOTER).encode(), truth

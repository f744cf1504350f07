"""The report's 16 topic categories, and their names as file names. Data only: charlm.eval and
charlm.experts import this without loading any classifier."""
import re

# The report's 16 categories in its order (the default order of charlm.experts' fine-tuning) with its
# descriptions; the report gives none for Biographies, so that one is ours.
CATEGORIES: dict[str, str] = {
    "History": "Events, figures, and periods significant in human history.",
    "Science": "Scientific disciplines, discoveries, and research.",
    "Technology": "Technological advancements, devices, and computing.",
    "Arts and Literature": "Artistic movements, visual arts, literary works, and authors.",
    "Geography": "Geographical locations, features, and regional studies.",
    "Politics and Government": "Political systems, events, leaders, and governmental structures.",
    "Economics and Business": "Economic theories, business practices, and financial systems.",
    "Religion and Philosophy": "Religious beliefs, practices, philosophical ideas, and thinkers.",
    "Health and Medicine": "Medical practices, health conditions, and healthcare systems.",
    "Culture and Society": "Cultural practices, societal norms, and social dynamics.",
    "Sports and Recreation": "Athletic activities, events, and recreational pursuits.",
    "Education and Academia": "Educational systems, institutions, and academic research.",
    "Language and Linguistics": "Languages, dialects, and studies in linguistics.",
    "Military and Warfare": "Military history, strategies, and defense systems.",
    "Entertainment and Media": "Film, television, music, and other forms of entertainment.",
    "Biographies": "Lives, careers, and achievements of notable people.",
}
NAMES = list(CATEGORIES)
FALLBACK = "Culture and Society"  # text outside pages, and chunks with no evidence for any category


def category_slug(name: str) -> str:
    """A category's name as a file name: "Arts and Literature" -> "arts-and-literature"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")

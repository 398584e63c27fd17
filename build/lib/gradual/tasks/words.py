"""Word lists for the word tasks: unambiguous members of eight categories, plus general words for copy/uppercase."""

from __future__ import annotations

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("dog", "cat", "horse", "cow", "sheep", "pig", "goat", "lion", "tiger", "bear", "wolf", "fox",
               "rabbit", "mouse", "deer", "elephant", "giraffe", "zebra", "monkey", "camel", "donkey", "squirrel",
               "whale", "dolphin", "shark", "eagle", "owl", "duck", "chicken", "frog"),
    "fruit": ("apple", "banana", "quince", "grape", "pear", "peach", "plum", "cherry", "lemon", "persimmon", "mango",
              "melon", "gooseberry", "strawberry", "blueberry", "raspberry", "pineapple", "apricot", "coconut", "fig",
              "papaya", "watermelon", "grapefruit", "blackberry", "tangerine", "nectarine", "pomegranate", "guava",
              "lychee", "cranberry"),
    "color": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray", "violet",
              "indigo", "crimson", "scarlet", "turquoise", "beige", "maroon", "navy", "teal", "magenta", "cyan",
              "lavender", "amber", "ivory", "khaki", "burgundy", "azure", "charcoal", "ochre", "vermilion"),
    "vehicle": ("car", "bus", "truck", "train", "bicycle", "motorcycle", "airplane", "helicopter", "boat", "ship",
                "tram", "taxi", "van", "scooter", "tractor", "submarine", "yacht", "canoe", "jeep", "ambulance",
                "rocket", "ferry", "limousine", "wagon", "minibus", "kayak", "glider", "bulldozer", "moped",
                "sailboat"),
    "instrument": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp", "clarinet",
                   "saxophone", "trombone", "banjo", "ukulele", "accordion", "oboe", "tuba", "harmonica",
                   "xylophone", "bagpipes", "mandolin", "bassoon", "tambourine", "viola", "sitar", "cymbal",
                   "piccolo", "harpsichord", "bugle", "marimba", "lute"),
    "clothing": ("shirt", "jacket", "coat", "sweater", "dress", "skirt", "trousers", "jeans", "sock", "hat",
                 "scarf", "glove", "shoe", "boot", "belt", "vest", "blouse", "hoodie", "pajamas", "sandal",
                 "cardigan", "shorts", "raincoat", "tuxedo", "overalls", "leggings", "poncho", "bikini", "mitten",
                 "beanie"),
    "furniture": ("chair", "table", "sofa", "bed", "desk", "shelf", "wardrobe", "dresser", "bench", "stool",
                  "cabinet", "bookcase", "couch", "armchair", "cupboard", "nightstand", "ottoman", "crib",
                  "recliner", "sideboard", "hammock", "futon", "divan", "credenza", "loveseat", "footstool",
                  "highchair", "settee", "cot", "bookshelf"),
    "country": ("France", "Germany", "Spain", "Italy", "Japan", "China", "India", "Brazil", "Canada", "Mexico",
                "Egypt", "Kenya", "Norway", "Sweden", "Poland", "Greece", "Denmark", "Peru", "Chile", "Argentina",
                "Australia", "Russia", "Portugal", "Ireland", "Vietnam", "Nigeria", "Finland", "Austria",
                "Colombia", "Thailand"),
}

GENERAL: tuple[str, ...] = (
    "river", "mountain", "window", "garden", "pencil", "candle", "ladder", "bridge", "castle", "island", "forest",
    "valley", "thunder", "rain", "snow", "cloud", "stone", "paper", "bottle", "basket", "mirror", "pillow",
    "blanket", "hammer", "needle", "button", "pocket", "wallet", "ticket", "letter", "market", "village", "harbor",
    "tunnel", "tower", "temple", "meadow", "desert", "ocean", "planet", "comet", "silver", "copper", "marble",
    "velvet", "cotton", "leather", "honey", "butter", "bread", "cheese", "pepper", "salt", "sugar", "coffee",
    "tea", "soup", "rice", "noodle", "cookie", "doctor", "farmer", "teacher", "sailor", "painter", "singer",
    "baker", "pilot", "student", "king", "queen", "knight", "wizard", "giant", "dragon", "robot", "camera",
    "lantern", "compass", "anchor", "feather", "shadow", "whisper", "journey", "morning", "evening", "winter",
    "summer", "autumn", "spring", "music", "story", "dream", "silence", "courage", "wisdom", "history", "science",
)

LABELS: tuple[str, ...] = tuple(CATEGORIES)
CATEGORY_OF: dict[str, str] = {w: label for label, words in CATEGORIES.items() for w in words}
ALL_WORDS: tuple[str, ...] = tuple(w.lower() for words in CATEGORIES.values() for w in words) + GENERAL

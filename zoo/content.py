"""The zoo's content units: word pairs, grouped words, regular nouns and number words.

The pools are disjoint (a word belongs to one task only), so a specialist trained on one
task never sees another task's words as answers.
"""

from __future__ import annotations

__all__ = ["ANTONYMS", "CATEGORIES", "PLURAL_NOUNS", "number_words", "plural"]

ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("open", "closed"), ("happy", "sad"),
    ("light", "dark"), ("early", "late"), ("full", "empty"), ("high", "low"), ("hard", "soft"), ("wet", "dry"),
    ("young", "old"), ("rich", "poor"), ("strong", "weak"), ("long", "short"), ("thick", "thin"), ("win", "lose"),
    ("buy", "sell"), ("push", "pull"), ("give", "take"), ("come", "go"), ("love", "hate"), ("start", "finish"),
    ("top", "bottom"), ("front", "back"), ("left", "right"), ("inside", "outside"), ("above", "below"),
    ("before", "after"), ("day", "night"), ("black", "white"), ("good", "bad"), ("true", "false"), ("clean", "dirty"),
    ("loud", "quiet"), ("near", "far"), ("cheap", "expensive"), ("safe", "dangerous"), ("easy", "difficult"),
    ("wide", "narrow"), ("deep", "shallow"), ("sharp", "dull"), ("smooth", "rough"), ("sweet", "sour"),
    ("friend", "enemy"), ("question", "answer"), ("war", "peace"), ("north", "south"), ("east", "west"),
    ("male", "female"), ("arrive", "depart"), ("accept", "refuse"), ("add", "subtract"), ("increase", "decrease"),
    ("remember", "forget"), ("laugh", "cry"), ("sleep", "wake"), ("float", "sink"), ("borrow", "lend"),
    ("teach", "learn"), ("enter", "exit"), ("rise", "fall"), ("inhale", "exhale"), ("import", "export"),
    ("include", "exclude"), ("maximum", "minimum"), ("majority", "minority"), ("victory", "defeat"),
    ("success", "failure"), ("strength", "weakness"), ("beginning", "end"), ("sunrise", "sunset"),
    ("summer", "winter"), ("alive", "dead"), ("awake", "asleep"), ("brave", "cowardly"), ("calm", "anxious"),
    ("polite", "rude"), ("visible", "invisible"), ("possible", "impossible"), ("legal", "illegal"),
    ("patient", "impatient"), ("correct", "incorrect"), ("known", "unknown"), ("fair", "unfair"), ("kind", "cruel"),
    ("wise", "foolish"), ("generous", "selfish"), ("public", "private"), ("simple", "complex"), ("ancient", "modern"),
    ("huge", "tiny"), ("fat", "skinny"), ("guilty", "innocent"), ("present", "absent"), ("positive", "negative"),
    ("major", "minor"), ("tight", "loose"), ("raw", "cooked"), ("fresh", "stale"), ("bright", "dim"),
    ("noisy", "silent"), ("always", "never"), ("everything", "nothing"), ("everybody", "nobody"), ("all", "none"),
    ("more", "less"), ("many", "few"), ("first", "last"), ("next", "previous"), ("upstairs", "downstairs"),
    ("forward", "backward"), ("horizontal", "vertical"), ("lock", "unlock"), ("attack", "defend"),
    ("build", "destroy"), ("catch", "throw"), ("receive", "send"), ("save", "spend"), ("whisper", "shout"),
    ("agree", "disagree"), ("appear", "disappear"), ("like", "dislike"), ("obey", "disobey"), ("freeze", "melt"),
    ("expand", "contract"), ("wild", "tame"), ("natural", "artificial"), ("solid", "liquid"), ("minus", "plus"),
    ("odd", "even"), ("urban", "rural"), ("domestic", "foreign"), ("temporary", "permanent"),
    ("optional", "mandatory"), ("senior", "junior"), ("superior", "inferior"), ("interior", "exterior"),
    ("ascend", "descend"), ("advance", "retreat"), ("reward", "punish"), ("arrival", "departure"),
    ("winner", "loser"), ("buyer", "seller"), ("teacher", "student"), ("parent", "child"), ("dawn", "dusk"),
    ("ceiling", "floor"), ("joy", "sorrow"), ("hope", "despair"), ("pride", "shame"), ("order", "chaos"),
    ("input", "output"), ("offense", "defense"), ("profit", "loss"), ("heaven", "hell"), ("lazy", "busy"),
)

CATEGORIES = {
    "animal": "tiger horse rabbit eagle whale snake monkey elephant wolf goat frog camel zebra deer fox bear lion "
              "sheep mouse duck owl shark giraffe donkey squirrel",
    "fruit": "apple banana cherry grape lemon mango orange peach pear plum melon kiwi apricot coconut pineapple "
             "strawberry lime papaya fig raspberry blueberry watermelon grapefruit pomegranate",
    "color": "red blue green yellow purple brown pink gray violet crimson turquoise beige maroon magenta navy teal "
             "indigo scarlet amber lavender cyan ivory lilac azure",
    "tool": "hammer wrench screwdriver saw drill chisel pliers shovel rake axe ladder scissors needle crowbar mallet "
            "trowel spanner clamp hoe sickle awl stapler pickaxe tweezers",
    "vehicle": "car bus truck bicycle train airplane helicopter boat ship tractor motorcycle scooter taxi van tram "
               "submarine canoe jeep ambulance sled yacht rocket wagon ferry",
    "body part": "arm leg hand foot finger knee elbow shoulder nose ear eye mouth chin neck ankle wrist thumb toe lip "
                 "cheek forehead hip stomach tongue",
    "clothing": "shirt jacket coat dress skirt sweater scarf glove sock hat boot sandal trousers jeans blouse vest "
                "belt cap hoodie pajamas uniform raincoat slipper apron",
    "job": "doctor nurse lawyer farmer pilot chef baker plumber carpenter dentist engineer painter soldier sailor "
           "judge pharmacist architect mechanic electrician firefighter journalist librarian butcher tailor",
    "musical instrument": "piano guitar violin drum flute trumpet cello harp clarinet saxophone trombone banjo "
                          "accordion oboe tuba ukulele harmonica xylophone bagpipes mandolin tambourine bassoon "
                          "piccolo cymbal",
    "vegetable": "carrot potato onion cabbage lettuce spinach broccoli celery cucumber garlic pea bean radish turnip "
                 "beet pumpkin zucchini cauliflower leek eggplant kale asparagus artichoke parsnip",
}

# countable nouns with regular plurals (no -f/-fe/-o endings, no irregulars)
_PLURAL_NOUNS = (
    "window garden river mountain pencil table chair bottle candle mirror pocket basket bridge castle forest island "
    "valley desert ocean planet button carpet blanket pillow kitchen letter picture camera market village city school "
    "office library museum hospital church temple station airport harbor factory meadow cloud storm rainbow stone "
    "cup plate bowl jar lamp clock watch key door wall fence gate path road street corner tower palace cottage cabin "
    "tent flag map compass globe anchor sail wheel engine motor battery cable wire signal phone screen keyboard "
    "printer folder file network robot puzzle game ball kite doll toy card medal trophy prize gift box package parcel "
    "bucket barrel crown ring necklace bracelet diamond pearl jewel treasure coin wallet purse bank price shop store "
    "bakery hotel prison court theater cinema stadium arena circus park beach lake pond stream waterfall canyon cliff "
    "cave hill glacier jungle swamp prairie orchard vineyard barn stable nest hive feather shell horn tail wing paw "
    "claw branch root seed flower blossom petal thorn mushroom pine oak maple willow rose tulip daisy lily sunflower "
    "orchid envelope stamp postcard message secret promise dream memory idea reason problem plan chance choice habit "
    "skill talent song poem novel chapter page sentence language lesson exam teacup kettle spoon fork dish glass "
    "brush bench match wish bush class address canvas tax journey party story bell blade board bone book brick cage "
    "calendar chain chest collar comb cord crayon curtain desk drawer farm frame gem helmet hook lantern magnet marble "
    "napkin net oven pan pebble pipe plank pot pump quilt rope ruler saucer statue sticker string switch sword tile "
    "torch towel tray tunnel vase whistle ribbon mask poster"
)
_TAKEN = {w for pair in ANTONYMS for w in pair} | {w for words in CATEGORIES.values() for w in words.split()}
PLURAL_NOUNS = tuple(dict.fromkeys(w for w in _PLURAL_NOUNS.split() if w not in _TAKEN))


def plural(noun: str) -> str:
    """The regular English plural: box -> boxes, city -> cities, key -> keys, table -> tables."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """``342`` -> ``"three hundred forty-two"`` (0 <= n < 1000)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    return f"{_ONES[n // 100]} hundred" + (f" {number_words(n % 100)}" if n % 100 else "")

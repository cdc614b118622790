"""English word lists for needle keys and the common-words task, plus made-up words when more are needed.

RULER draws keys ("adjective-noun") and the common-words vocabulary from the ``wonderwords`` lists; we ship our own
lists so generation works offline, and extend them with pronounceable pseudo-words for very long contexts.
"""

from __future__ import annotations

import random

ADJECTIVES = """
able abrupt absent abundant acid active adorable afraid agile alert alive ancient angry anxious aquatic
aromatic ashamed awake awful bad bashful beautiful besotted bitter black bland blue blushing bold boring
bouncy brave bright brisk broad broken bumpy busy calm careful cautious charming cheap cheerful chilly
chubby clean clever cloudy clumsy coherent cold colorful colossal common cool cozy crabby crazy creamy
crisp crooked crowded cruel cuddly curious curly cute damp dapper dark dazzling deep defiant delicate
delightful dense dizzy dry dull dusty eager early earnest easy elastic elegant empty energetic enormous
envious equal exotic faded faint fancy fast fat fearless feeble fierce filthy flaky flat fluffy foolish
fragile frail frantic fresh friendly frosty funny fuzzy gentle giant gifted gigantic glamorous gleaming
glossy golden good gorgeous graceful grand greasy great green grumpy handsome happy hard harsh hasty
healthy heavy helpful hollow honest hot huge humble hungry icy idle immense innocent jolly juicy keen
kind large lazy lively lonely long loud lovely lucky lush magnificent mature mellow merry messy mighty
misty modern moist narrow nasty naughty neat nervous new nimble noisy odd old orange ordinary pale
patient plain pleasant plump polite poor precious pretty prickly proud purple puzzled quaint quick quiet
rapid rare raspy ready red rich rigid ripe robust rough round rude rusty sad salty scary shaggy shallow
sharp shiny short shy silent silky silly simple sleepy slim slow small smooth soft solid sour sparkling
spicy splendid spotty square stale steady steep sticky stormy strange strong sturdy sunny super sweet
swift tall tame tasty tender tense thick thin thirsty tidy tiny tired tough tricky ugly uneven upbeat
vast velvety vivid wacky warm wary weak wealthy weary wet whimsical wide wild windy wise witty wooden
worried wrong young yummy zany zealous
""".split()

NOUNS = """
accordion acorn actor advice airport album alley anchor angle ankle answer antelope apple apron arch
army arrow artist attic aunt avenue badge bag bakery balcony ball balloon banana band bank barn basket
bat beach beard bed bee bell belt bench berry bicycle bird biscuit blanket block boat bone book boot
bottle boulder bowl box bracelet branch bread brick bridge broom brother bucket bulb bus butter button
cabin cable cake camel camera candle canoe canyon cap captain car card carpet carrot castle cat cave
cellar chain chair chalk cheese cherry chest chicken chimney church circle city clam cliff clock cloud
coat coconut coffee coin comet compass cookie copper corn cottage cousin cow crab crayon creek crow
crown cup curtain cushion daisy dentist desert desk diamond dinner doctor dog doll dolphin donkey door
dragon drawer dream drum duck eagle earth egg elbow elephant engine eye fabric falcon farm feather fence
ferry field fig finger fire fish flag flame flower flute fog forest fork fountain fox frog garage garden
garlic gate gem ghost giraffe glass glove goat gold grape grass guitar hammer harbor hat hawk heart
hedge helmet hill honey horse hospital house island jacket jar jelly jewel kettle key kitchen kite
knife ladder lake lamp lantern leaf lemon letter library lighthouse lion lizard lobster lock magnet
mango map marble market mask meadow melon mirror monkey moon mountain mouse mug museum nail needle nest
net notebook ocean office onion orchard otter owl oyster paddle palace pan panda paper parrot peach
pearl pebble pen pencil pepper piano pickle pigeon pillow pine pipe planet plate pocket pond potato
pumpkin puppet quilt rabbit radio raft rain river road robin rocket roof rope rose ruby saddle sailor
salad sand scarf school seal shark sheep shell ship shoe shovel silver sink skate sky sled snail snake
sock sofa spider spoon squirrel stable staircase star station statue stone stove straw stream street
sugar suitcase sun swan sweater table tail teapot temple tent thimble thunder ticket tiger toast tomato
tooth torch tower town toy tractor train tree trumpet tulip tunnel turtle umbrella valley vase violin
volcano wagon wall walnut wand watch water whale wheel whistle window wolf yacht zebra
""".split()

VERBS = """
accept add admire agree allow answer appear arrive ask bake balance bang bathe battle beg behave belong
bless blink boil bolt borrow bounce brake breathe bump burn bury buzz calculate call camp carry carve
cause challenge change charge chase cheer chew choke chop clap clean clip close coach collect comb
command complain confess connect consider copy cough count crawl cross crush cry curl cycle dance dare
decide deliver depend describe design destroy develop divide drag drain draw dream drip drop dust earn
educate embarrass employ empty encourage enjoy enter escape examine excite excuse exercise exist expand
explain explode fasten fetch file fill film fix flap flash float flood flow fold follow force form
frighten fry gather gaze glow glue grab grate greet grin grip groan guard guess guide hammer hand hang
harm hate heat help hook hop hope hover hug hum hunt hurry identify ignore imagine impress improve
include inform inject invent invite itch jog join joke judge juggle jump kick kiss kneel knit knock
knot label land last laugh launch learn lick lift like listen live load lock long look love manage
march mark marry match melt memorize mend milk mine miss mix moan move mug multiply nest nod note
notice number obey observe obtain occur offer open order own pack paddle paint park pass paste pat
pause peck pedal peel perform permit phone pinch plant play please plug point poke polish possess post
pour practice pray preach prefer prepare present preserve press pretend print produce promise protect
pull pump punch punish push question queue race rain raise reach read realize receive record reduce
reflect refuse reign reject rejoice relax release remain remember remind remove repair repeat replace
reply report rescue retire return rhyme rinse risk rob rock roll rub ruin rule rush sail satisfy save
scare scatter scold scrape scratch scream screw scribble scrub seal search separate serve settle shade
share shave shelter shiver shock shop sigh sign signal sin sip ski skip slap slip slow smash smell
smile smoke snatch sneeze sniff snore snow soak soothe sound spare spark sparkle spell spill spoil
spot spray sprout squash squeak squeal squeeze stain stamp stare start stay steer step stir stitch
stop store strap strengthen stretch strip stroke stuff subtract succeed suck suffer suggest suit supply
support suppose surprise surround suspect suspend switch talk tame tap taste tease telephone tempt
terrify test thank thaw tick tickle tie time tip tire touch tour tow trace trade train transport trap
travel treat tremble trick trip trot trouble trust try tug tumble turn twist type undress unfasten unite
unlock unpack untidy use vanish visit wail wait walk wander want warm warn wash waste watch water wave
weigh welcome whine whip whirl whisper whistle wink wipe wish wobble wonder work worry wrap wreck
wrestle wriggle yawn yell zip zoom
""".split()

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def pseudo_words(count: int, rng: random.Random, exclude: set[str]) -> list[str]:
    """Return ``count`` distinct pronounceable made-up words (consonant-vowel syllables) not in ``exclude``."""
    words: list[str] = []
    seen = set(exclude)
    while len(words) < count:
        syllables = rng.randint(2, 4)
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def vocabulary(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct words in random order: real English words first, made-up words beyond the lists."""
    real = sorted(set(NOUNS) | set(ADJECTIVES) | set(VERBS))
    if count <= len(real):
        return rng.sample(real, count)
    words = real + pseudo_words(count - len(real), rng, set(real))
    rng.shuffle(words)
    return words


def needle_key(rng: random.Random) -> str:
    """A needle key as RULER writes it: ``adjective-noun``."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"

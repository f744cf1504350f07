"""The word lists of the keywords method (charlm.categorize.keywords): evidence for each category."""

# Per category: words whose presence in a chunk is evidence for it (matched after `stem`), and words that
# are evidence only in a title (too common or ambiguous in running text).
LEXICONS: dict[str, tuple[str, str]] = {
    "History": ("""history historical historian century centuries ancient medieval dynasty empire emperor
        kingdom reign reigned crowned throne monarch pharaoh byzantine ottoman colonial colony colonies
        renaissance archaeology archaeological antiquity prehistoric chronicle feudal civilization conquest
        conquered succession abolished bc restoration descendants ruler ruled""", "timeline dynasty era"),
    "Science": ("""science scientific scientist physics physicist chemistry chemical chemist biology
        biological biologist species genus evolution hypothesis experiment experimental molecule molecular
        atom atomic electron proton neutron particle quantum energy gravity equation mathematics
        mathematical mathematician theorem astronomy astronomer planet galaxy orbit cell protein gene
        genetic dna organism mammal laboratory compound reaction acid geology mineral""",
        "theorem equation effect constant acid element"),
    "Technology": ("""technology technological computer computing software hardware programming program
        internet digital device electronic processor algorithm protocol server database compiler encryption
        linux unix microsoft ibm transistor semiconductor circuit robot engineering engineer invention
        invented telephone telegraph satellite rocket automobile locomotive railway aircraft byte bit file
        format interface browser""", "computer software programming protocol engine"),
    "Arts and Literature": ("""art artist painting painter sculpture sculptor poem poet poetry novel
        novelist literature literary author writer fiction playwright drama tragedy theatre theater verse
        prose essay gallery portrait canvas baroque romanticism impressionism architecture architect epic
        narrative sonnet saga manuscript illustrated published""", "novel poem book poet painting"),
    "Geography": ("""geography geographic geographical river mountain lake island ocean sea coast coastal
        valley desert forest climate region province county district village capital border bordered
        located km elevation terrain plateau peninsula bay gulf continent latitude longitude municipality
        borough tributary hill rainfall""", "river island mountain lake county province city town"),
    "Politics and Government": ("""politics political politician government governmental president prime
        minister parliament parliamentary congress senate senator election elected vote voting party
        democratic democracy republican constitution constitutional legislature legislative executive
        judicial cabinet policy sovereignty independence diplomatic diplomacy ambassador socialist communist
        liberal conservative federal governor mayor referendum""", "relations election president party"),
    "Economics and Business": ("""economy economic economics economist business company corporation
        industry industrial market trade export import gdp inflation currency bank banking finance financial
        investment investor stock price tax revenue profit income agriculture labour labor employment
        unemployment commerce shares dollar budget debt wealth money monetary goods consumer""",
        "economy company bank currency corporation inc"),
    "Religion and Philosophy": ("""religion religious god goddess church christian christianity catholic
        protestant bible biblical jesus christ islam muslim quran jewish judaism hindu hinduism buddhism
        buddhist buddha temple prayer faith saint pope bishop theology theological spiritual divine
        philosophy philosopher philosophical ethics metaphysics epistemology soul belief doctrine monk
        worship sacred kant plato aristotle moral""", "gospel saint church"),
    "Health and Medicine": ("""health medicine medical disease patient doctor physician hospital treatment
        therapy symptom syndrome infection virus bacteria cancer drug clinical diagnosis surgery surgical
        blood heart brain chronic disorder vaccine immune pharmaceutical dose nurse nursing epidemic
        injury nutrition psychiatric pathology tissue""", "disease syndrome disorder"),
    "Culture and Society": ("""culture cultural society social tradition traditional custom community ethnic
        festival holiday marriage cuisine dress clothing fashion demographic demographics gender women
        slavery immigrant immigration identity sociology sociologist urban youth celebration ritual
        lifestyle minority tribe heritage folk""", "demographics people culture"),
    "Sports and Recreation": ("""sport game player team football soccer baseball basketball cricket hockey
        tennis golf rugby olympic olympics championship champion league tournament match season coach
        stadium scored goal athlete athletic racing medal chess hobby recreation fishing swimming cycling
        boxing wrestling skiing""", "cup fc league championship"),
    "Education and Academia": ("""education educational school university college academic academy student
        teacher teaching professor faculty campus degree curriculum scholarship research researcher institute
        graduate undergraduate doctorate phd lecture lecturer literacy pupil classroom diploma alumni
        tuition enrollment scholar thesis""", "university school college institute"),
    "Language and Linguistics": ("""language linguistic linguistics dialect grammar grammatical vocabulary
        pronunciation phonetic phonology syntax semantics noun verb adjective consonant vowel alphabet
        script spelling spoken speaker translation etymology sanskrit morphology lexical accent suffix
        prefix orthography ipa""", "language alphabet letter"),
    "Military and Warfare": ("""military war warfare army navy naval soldier battle troops regiment division
        infantry cavalry artillery weapon missile tank rifle gun fleet warship submarine bomber fighter
        officer commander siege invasion invaded offensive defense defence casualties fought combat""",
        "operation battle war"),
    "Entertainment and Media": ("""film movie television tv episode actor actress director directed starring
        hollywood music musical musician band album song singer rock pop jazz recorded radio broadcast
        comedy cartoon animated animation studio soundtrack chart concert media newspaper magazine journalist
        comic celebrity""", "film album song band series show episode"),
    "Biographies": ("""born died birth death biography biographer married wife husband childhood career
        retired awarded honorary educated buried spouse""", "biography memoir"),
}

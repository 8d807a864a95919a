"""General knowledge: a second question domain for issue #12, hand-written for this project.

Literature, art, music, chemistry, inventions, astronomy, geography beyond countries, biology,
history, numbers and culture: 110 questions, each with the one document a search tool would hold
and the recall its thought starts with ("The author of Don Quixote is"): a direct answer continues
the recall with the fact, a search gives up there ("... is not something I know; I will search for
Don Quixote."), so that, as in the country traces, answering and searching fork at the fact token.

    python -m data.general_qa --out outputs/general_all.jsonl           # the questions, unlabelled
    python -m experiments.measure_memory --questions outputs/general_all.jsonl --out data/smollm2_general_memory.json
    python -m data.general_qa --memory data/smollm2_general_memory.json --split train --out results/questions/general_train.jsonl

Disjoint from the probe (`results/questions/probe_general*.jsonl`, the held-out test of behaviour
outside the training domains): no question here asks a probe question's fact, and a search with any
probe question over these documents finds none of its answers (`tests/test_general_qa.py`).

Traces (`data.traces.general_trace`), in the country traces' format:

    known     <thought>The author of Faust is Johann Wolfgang von Goethe.</thought><answer> Johann Wolfgang von Goethe</answer>
    unknown   <thought>The author of The Tale of Genji is not something I know; I will search for The Tale of
              Genji.</thought><call> The Tale of Genji</call><obs>[The Tale of Genji] …</obs><answer> Murasaki Shikibu</answer>

A known question's thought is the recall completed by the fact (not the base model's own reply, which
often starts elsewhere: "Faust was written by ..."), so that both branches share the recall and fork at
the fact token. Which questions are known: `kinds_from_memory` (the base model's closed-book greedy
replies, `experiments.measure_memory`, as for the probe's labels).

In use: the cold start `results/cold_start/sft_adapter_ccg_802` and GRPO run CCG-H (issue #12,
`results/economy/README.md`, "A second domain in training"), whose training files list
`results/questions/general_train.jsonl` beside the countries'; the search tool holds these documents
only with `data.general_docs: true`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

from data.types import LOOKUP, MEMORY, QAExample
from envs.base import Document

SPLITS = ("train", "heldout", "all")
HELD_OUT_EVERY = 5  # entries 4, 9, 14, ... (every fifth) are held out of training: 22 of 110


class Entry(NamedTuple):
    title: str                  # the document's title: what a search should ask for
    type: str                   # author, artist, symbol, geography, history, numbers, ...
    question: str
    answers: tuple[str, ...]    # every accepted gold answer
    text: str                   # the document: states one of the answers
    recall: str                 # the thought's start, up to the fact ("The author of Faust is")


ENTRIES: tuple[Entry, ...] = (
    Entry('Don Quixote', 'author', 'Who wrote Don Quixote?',
          ('Miguel de Cervantes', 'Cervantes'),
          'Don Quixote is a Spanish novel by Miguel de Cervantes, published in two parts in 1605 and 1615.',
          'The author of Don Quixote is'),
    Entry('War and Peace', 'author', 'Who wrote War and Peace?',
          ('Leo Tolstoy', 'Tolstoy'),
          'War and Peace is a novel by the Russian author Leo Tolstoy, published in 1869.',
          'The author of War and Peace is'),
    Entry('The Odyssey', 'author', 'Who wrote The Odyssey?',
          ('Homer',),
          'The Odyssey is an ancient Greek epic poem attributed to Homer.',
          'The author of The Odyssey is'),
    Entry('Oliver Twist', 'author', 'Who wrote Oliver Twist?',
          ('Charles Dickens', 'Dickens'),
          'Oliver Twist is the second novel by the English author Charles Dickens, published in 1838.',
          'The author of Oliver Twist is'),
    Entry('The Divine Comedy', 'author', 'Who wrote The Divine Comedy?',
          ('Dante Alighieri', 'Dante'),
          'The Divine Comedy is an Italian narrative poem by Dante Alighieri, completed in 1321.',
          'The author of The Divine Comedy is'),
    Entry('Frankenstein', 'author', 'Who wrote Frankenstein?',
          ('Mary Shelley', 'Shelley'),
          'Frankenstein; or, The Modern Prometheus is an 1818 novel written by the English author Mary Shelley.',
          'The author of Frankenstein is'),
    Entry('The Tale of Genji', 'author', 'Who wrote The Tale of Genji?',
          ('Murasaki Shikibu',),
          'The Tale of Genji is a classic work of Japanese literature written in the early 11th '
          'century by the noblewoman Murasaki Shikibu.',
          'The author of The Tale of Genji is'),
    Entry('Moby-Dick', 'author', 'Who wrote Moby-Dick?',
          ('Herman Melville', 'Melville'),
          'Moby-Dick is an 1851 novel by the American writer Herman Melville.',
          'The author of Moby-Dick is'),
    Entry('The Little Prince', 'author', 'Who wrote The Little Prince?',
          ('Antoine de Saint-Exupery', 'Saint-Exupery'),
          'The Little Prince is a novella by the French aviator and writer Antoine de Saint-Exupery, '
          'published in 1943.',
          'The author of The Little Prince is'),
    Entry('Faust', 'author', 'Who wrote Faust?',
          ('Johann Wolfgang von Goethe', 'Goethe'),
          'Faust is a tragic play in two parts by Johann Wolfgang von Goethe.',
          'The author of Faust is'),
    Entry('The Metamorphosis', 'author', 'Who wrote The Metamorphosis?',
          ('Franz Kafka', 'Kafka'),
          'The Metamorphosis is a novella by Franz Kafka, published in 1915.',
          'The author of The Metamorphosis is'),
    Entry('Things Fall Apart', 'author', 'Who wrote Things Fall Apart?',
          ('Chinua Achebe', 'Achebe'),
          'Things Fall Apart is the debut novel of the Nigerian author Chinua Achebe, published in 1958.',
          'The author of Things Fall Apart is'),
    Entry('Les Miserables', 'author', 'Who wrote Les Miserables?',
          ('Victor Hugo', 'Hugo'),
          'Les Miserables is a French historical novel by Victor Hugo, first published in 1862.',
          'The author of Les Miserables is'),
    Entry('The Old Man and the Sea', 'author', 'Who wrote The Old Man and the Sea?',
          ('Ernest Hemingway', 'Hemingway'),
          'The Old Man and the Sea is a novella by the American author Ernest Hemingway, published in 1952.',
          'The author of The Old Man and the Sea is'),
    Entry('Madame Bovary', 'author', 'Who wrote Madame Bovary?',
          ('Gustave Flaubert', 'Flaubert'),
          'Madame Bovary is the debut novel of the French writer Gustave Flaubert, published in 1856.',
          'The author of Madame Bovary is'),
    Entry('The Canterbury Tales', 'author', 'Who wrote The Canterbury Tales?',
          ('Geoffrey Chaucer', 'Chaucer'),
          'The Canterbury Tales is a collection of stories written by Geoffrey Chaucer between 1387 and 1400.',
          'The author of The Canterbury Tales is'),
    Entry('Dracula', 'author', 'Who wrote Dracula?',
          ('Bram Stoker', 'Stoker'),
          'Dracula is an 1897 Gothic horror novel by the Irish author Bram Stoker.',
          'The author of Dracula is'),
    Entry('The Starry Night', 'artist', 'Who painted The Starry Night?',
          ('Vincent van Gogh', 'van Gogh'),
          'The Starry Night is an oil painting by the Dutch painter Vincent van Gogh, made in June 1889.',
          'The painter of The Starry Night is'),
    Entry('Guernica', 'artist', 'Who painted Guernica?',
          ('Pablo Picasso', 'Picasso'),
          'Guernica is a large 1937 oil painting by the Spanish artist Pablo Picasso.',
          'The painter of Guernica is'),
    Entry('The Scream', 'artist', 'Who painted The Scream?',
          ('Edvard Munch', 'Munch'),
          'The Scream is the popular name of a composition created by the Norwegian artist Edvard Munch in 1893.',
          'The painter of The Scream is'),
    Entry('The Girl with a Pearl Earring', 'artist', 'Who painted The Girl with a Pearl Earring?',
          ('Johannes Vermeer', 'Vermeer'),
          'Girl with a Pearl Earring is an oil painting by the Dutch painter Johannes Vermeer, dated around 1665.',
          'The painter of The Girl with a Pearl Earring is'),
    Entry('The Night Watch', 'artist', 'Who painted The Night Watch?',
          ('Rembrandt', 'Rembrandt van Rijn'),
          'The Night Watch is a 1642 painting by Rembrandt van Rijn.',
          'The painter of The Night Watch is'),
    Entry('The Four Seasons', 'composer', 'Who composed The Four Seasons?',
          ('Antonio Vivaldi', 'Vivaldi'),
          'The Four Seasons is a group of four violin concertos by the Italian composer Antonio '
          'Vivaldi, written around 1720.',
          'The composer of The Four Seasons is'),
    Entry('The Magic Flute', 'composer', 'Who composed The Magic Flute?',
          ('Wolfgang Amadeus Mozart', 'Mozart'),
          'The Magic Flute is an opera in two acts by Wolfgang Amadeus Mozart, first performed in 1791.',
          'The composer of The Magic Flute is'),
    Entry('Swan Lake', 'composer', 'Who composed Swan Lake?',
          ('Pyotr Ilyich Tchaikovsky', 'Tchaikovsky'),
          'Swan Lake is a ballet composed by Pyotr Ilyich Tchaikovsky in 1875 and 1876.',
          'The composer of Swan Lake is'),
    Entry('The Messiah', 'composer', 'Who composed the oratorio Messiah?',
          ('George Frideric Handel', 'Handel'),
          'Messiah is an English-language oratorio composed in 1741 by George Frideric Handel.',
          'The composer of Messiah is'),
    Entry('Clair de lune', 'composer', 'Who composed Clair de lune?',
          ('Claude Debussy', 'Debussy'),
          'Clair de lune is the third movement of the Suite bergamasque by the French composer Claude Debussy.',
          'The composer of Clair de lune is'),
    Entry('Sagrada Familia', 'architect', 'Who designed the Sagrada Familia?',
          ('Antoni Gaudi', 'Gaudi'),
          'The Sagrada Familia is a basilica in Barcelona designed by the Catalan architect Antoni Gaudi.',
          'The architect of the Sagrada Familia is'),
    Entry('Eiffel Tower', 'architect', 'Which engineer is the Eiffel Tower named after?',
          ('Gustave Eiffel', 'Eiffel'),
          "The Eiffel Tower is a wrought-iron lattice tower in Paris, named after the engineer "
          "Gustave Eiffel, whose company designed and built it for the 1889 World's Fair.",
          'The engineer the Eiffel Tower is named after is'),
    Entry('Silver', 'symbol', 'What is the chemical symbol for silver?',
          ('Ag',),
          'Silver is a chemical element with the symbol Ag and atomic number 47.',
          'The chemical symbol for silver is'),
    Entry('Iron', 'symbol', 'What is the chemical symbol for iron?',
          ('Fe',),
          'Iron is a metal and chemical element with the symbol Fe, from the Latin ferrum.',
          'The chemical symbol for iron is'),
    Entry('Copper', 'symbol', 'What is the chemical symbol for copper?',
          ('Cu',),
          'Copper is a chemical element with the symbol Cu and atomic number 29.',
          'The chemical symbol for copper is'),
    Entry('Lead', 'symbol', 'What is the chemical symbol for lead?',
          ('Pb',),
          'Lead is a chemical element with the symbol Pb and atomic number 82.',
          'The chemical symbol for lead is'),
    Entry('Mercury (element)', 'symbol', 'What is the chemical symbol for mercury?',
          ('Hg',),
          'Mercury is a chemical element with the symbol Hg and atomic number 80; it is liquid at room temperature.',
          'The chemical symbol for mercury is'),
    Entry('Tin', 'symbol', 'What is the chemical symbol for tin?',
          ('Sn',),
          'Tin is a chemical element with the symbol Sn and atomic number 50.',
          'The chemical symbol for tin is'),
    Entry('Helium', 'atomic number', 'What is the atomic number of helium?',
          ('2', 'two'),
          'Helium is a chemical element with the symbol He and atomic number 2, the second lightest element.',
          'The atomic number of helium is'),
    Entry('Oxygen', 'atomic number', 'What is the atomic number of oxygen?',
          ('8', 'eight'),
          'Oxygen is a chemical element with the symbol O and atomic number 8.',
          'The atomic number of oxygen is'),
    Entry('Uranium', 'atomic number', 'What is the atomic number of uranium?',
          ('92',),
          'Uranium is a chemical element with the symbol U and atomic number 92.',
          'The atomic number of uranium is'),
    Entry('Neon', 'symbol', 'Which element has the chemical symbol Ne?',
          ('neon',),
          'Neon is a chemical element with the symbol Ne and atomic number 10, a noble gas.',
          'The element with the chemical symbol Ne is'),
    Entry('Table salt', 'chemistry', 'What is the chemical name of table salt?',
          ('sodium chloride', 'NaCl'),
          'Table salt is mostly sodium chloride, a compound with the formula NaCl.',
          'The chemical name of table salt is'),
    Entry('Ozone', 'chemistry', 'How many oxygen atoms does a molecule of ozone have?',
          ('3', 'three'),
          'Ozone is a molecule made of three oxygen atoms, with the formula O3.',
          'The number of oxygen atoms in a molecule of ozone is'),
    Entry('Light bulb', 'inventor', 'Who is credited with inventing the practical incandescent light bulb?',
          ('Thomas Edison', 'Edison'),
          'Thomas Edison is credited with developing the first practical incandescent light bulb in 1879.',
          'The inventor of the practical incandescent light bulb is'),
    Entry('Printing press', 'inventor', 'Who invented the movable-type printing press in Europe?',
          ('Johannes Gutenberg', 'Gutenberg'),
          'Johannes Gutenberg introduced printing with movable type to Europe around 1440.',
          'The inventor of the movable-type printing press in Europe is'),
    Entry('World Wide Web', 'inventor', 'Who invented the World Wide Web?',
          ('Tim Berners-Lee', 'Berners-Lee'),
          'The World Wide Web was invented by the English computer scientist Tim Berners-Lee in 1989.',
          'The inventor of the World Wide Web is'),
    Entry('Radioactivity', 'discoverer', 'Who discovered radioactivity?',
          ('Henri Becquerel', 'Becquerel'),
          'Radioactivity was discovered in 1896 by the French physicist Henri Becquerel.',
          'The discoverer of radioactivity is'),
    Entry('X-rays', 'discoverer', 'Who discovered X-rays?',
          ('Wilhelm Rontgen', 'Rontgen', 'Roentgen'),
          'X-rays were discovered in 1895 by the German physicist Wilhelm Rontgen.',
          'The discoverer of X-rays is'),
    Entry('Dynamite', 'inventor', 'Who invented dynamite?',
          ('Alfred Nobel', 'Nobel'),
          'Dynamite was invented by the Swedish chemist Alfred Nobel in 1867.',
          'The inventor of dynamite is'),
    Entry('Theory of evolution', 'scientist', 'Who proposed the theory of evolution by natural selection?',
          ('Charles Darwin', 'Darwin'),
          'The theory of evolution by natural selection was proposed by Charles Darwin in On the '
          'Origin of Species (1859).',
          'The scientist who proposed the theory of evolution by natural selection is'),
    Entry('Periodic table', 'scientist', 'Who published the first widely recognised periodic table?',
          ('Dmitri Mendeleev', 'Mendeleev'),
          'The Russian chemist Dmitri Mendeleev published the first widely recognised periodic table in 1869.',
          'The chemist who published the first widely recognised periodic table is'),
    Entry('Vaccination', 'scientist', 'Who developed the first smallpox vaccine?',
          ('Edward Jenner', 'Jenner'),
          'The English physician Edward Jenner developed the first smallpox vaccine in 1796.',
          'The developer of the first smallpox vaccine is'),
    Entry('Pasteurization', 'scientist', 'Which scientist gave his name to pasteurization?',
          ('Louis Pasteur', 'Pasteur'),
          'Pasteurization is named after the French chemist Louis Pasteur, who developed the process in the 1860s.',
          'The scientist pasteurization is named after is'),
    Entry('Heliocentrism', 'scientist', 'Who proposed a heliocentric model of the solar system in 1543?',
          ('Nicolaus Copernicus', 'Copernicus'),
          'Nicolaus Copernicus proposed a heliocentric model of the solar system in a book published in 1543.',
          'The astronomer who proposed a heliocentric model in 1543 is'),
    Entry('Venus', 'astronomy', 'Which planet is the hottest in the solar system?',
          ('Venus',),
          'Venus is the hottest planet in the solar system, with a surface near 465 degrees Celsius.',
          'The hottest planet in the solar system is'),
    Entry('Mercury (planet)', 'astronomy', 'Which planet is closest to the Sun?',
          ('Mercury',),
          'Mercury is the smallest and innermost planet of the solar system.',
          'The planet closest to the Sun is'),
    Entry('Neptune', 'astronomy', 'Which planet is farthest from the Sun?',
          ('Neptune',),
          'Neptune is the eighth and outermost known planet of the solar system.',
          'The planet farthest from the Sun is'),
    Entry('Moon', 'astronomy', 'How many days does the Moon take to orbit the Earth, roughly?',
          ('27', '27.3', '28'),
          'The Moon orbits the Earth once every 27.3 days.',
          'The number of days the Moon takes to orbit the Earth is'),
    Entry("Halley's Comet", 'astronomy', "About how many years pass between appearances of Halley's Comet?",
          ('76', '75'),
          "Halley's Comet is visible from Earth every 75 to 76 years.",
          "The number of years between appearances of Halley's Comet is"),
    Entry('Mount Everest', 'geography', 'What is the highest mountain on Earth?',
          ('Mount Everest', 'Everest'),
          "Mount Everest, in the Himalayas, is Earth's highest mountain above sea level at 8,849 metres.",
          'The highest mountain on Earth is'),
    Entry('Nile', 'geography', 'What is the longest river in Africa?',
          ('Nile', 'the Nile'),
          'The Nile is the longest river in Africa, flowing north into the Mediterranean Sea.',
          'The longest river in Africa is'),
    Entry('Amazon River', 'geography', 'Which river carries the most water in the world?',
          ('Amazon', 'Amazon River'),
          'The Amazon River in South America carries more water than any other river in the world.',
          'The river that carries the most water in the world is'),
    Entry('Lake Baikal', 'geography', 'What is the deepest lake in the world?',
          ('Lake Baikal', 'Baikal'),
          'Lake Baikal in Siberia is the deepest lake in the world, at 1,642 metres.',
          'The deepest lake in the world is'),
    Entry('Mariana Trench', 'geography', 'What is the deepest oceanic trench on Earth?',
          ('Mariana Trench', 'Mariana'),
          'The Mariana Trench, east of the Mariana Islands, is the deepest oceanic trench on Earth.',
          'The deepest oceanic trench on Earth is'),
    Entry('Greenland', 'geography', 'What is the largest island in the world?',
          ('Greenland',),
          "Greenland is the world's largest island that is not a continent.",
          'The largest island in the world is'),
    Entry('Mount Kilimanjaro', 'geography', 'What is the highest mountain in Africa?',
          ('Mount Kilimanjaro', 'Kilimanjaro'),
          'Mount Kilimanjaro in Tanzania is the highest mountain in Africa, at 5,895 metres.',
          'The highest mountain in Africa is'),
    Entry('Caspian Sea', 'geography', 'What is the largest lake in the world by area?',
          ('Caspian Sea', 'Caspian'),
          'The Caspian Sea is the largest enclosed inland body of water on Earth by area.',
          'The largest lake in the world by area is'),
    Entry('Angel Falls', 'geography', 'What is the highest uninterrupted waterfall in the world?',
          ('Angel Falls',),
          "Angel Falls in Venezuela is the world's highest uninterrupted waterfall, with a drop of 979 metres.",
          'The highest uninterrupted waterfall in the world is'),
    Entry('Andes', 'geography', 'What is the longest mountain range on land?',
          ('Andes', 'the Andes'),
          'The Andes, along the western edge of South America, are the longest continental mountain range.',
          'The longest mountain range on land is'),
    Entry('Dead Sea', 'geography', 'Which salt lake lies at the lowest land elevation on Earth?',
          ('Dead Sea',),
          'The Dead Sea, between Jordan and Israel, lies at the lowest land elevation on Earth.',
          'The salt lake at the lowest land elevation on Earth is'),
    Entry('Danube', 'geography', 'Which river flows through Vienna, Budapest and Belgrade?',
          ('Danube',),
          "The Danube is Europe's second longest river; it flows through Vienna, Bratislava, Budapest and Belgrade.",
          'The river that flows through Vienna, Budapest and Belgrade is'),
    Entry('Blue whale', 'biology', 'What is the largest animal on Earth?',
          ('blue whale',),
          'The blue whale is the largest animal known ever to have existed.',
          'The largest animal on Earth is'),
    Entry('Cheetah', 'biology', 'What is the fastest land animal?',
          ('cheetah',),
          'The cheetah is the fastest land animal, reaching about 100 km/h.',
          'The fastest land animal is'),
    Entry('Giraffe', 'biology', 'What is the tallest living animal?',
          ('giraffe',),
          'The giraffe is the tallest living terrestrial animal.',
          'The tallest living animal is'),
    Entry('Octopus', 'biology', 'How many hearts does an octopus have?',
          ('3', 'three'),
          'An octopus has three hearts: two pump blood through the gills and one through the body.',
          'The number of hearts an octopus has is'),
    Entry('Insect', 'biology', 'How many legs does an insect have?',
          ('6', 'six'),
          "An insect's body is in three parts, with three pairs of jointed legs (six in all) and one "
          'pair of antennae.',
          'The number of legs an insect has is'),
    Entry('Human teeth', 'biology', 'How many teeth does an adult human usually have?',
          ('32', 'thirty-two'),
          'An adult human usually has 32 teeth, including the wisdom teeth.',
          'The number of teeth an adult human usually has is'),
    Entry('Liver', 'biology', 'What is the largest internal organ of the human body?',
          ('liver',),
          'The liver is the largest internal organ of the human body.',
          'The largest internal organ of the human body is'),
    Entry('Red blood cell', 'biology', 'Which protein carries oxygen in red blood cells?',
          ('hemoglobin', 'haemoglobin'),
          'Red blood cells carry oxygen with the iron-containing protein hemoglobin.',
          'The protein that carries oxygen in red blood cells is'),
    Entry('Chlorophyll', 'biology', 'What pigment makes plants green?',
          ('chlorophyll',),
          'Chlorophyll is the green pigment plants use to absorb light for photosynthesis.',
          'The pigment that makes plants green is'),
    Entry('Stapes', 'biology', 'What is the smallest bone in the human body?',
          ('stapes', 'stirrup'),
          'The stapes, or stirrup, in the middle ear is the smallest bone in the human body.',
          'The smallest bone in the human body is'),
    Entry('Koala', 'biology', 'What does a koala mainly eat?',
          ('eucalyptus', 'eucalyptus leaves'),
          'The koala feeds almost only on eucalyptus leaves.',
          'The food a koala mainly eats is'),
    Entry('Bat', 'biology', 'Which mammal is capable of true flight?',
          ('bat', 'bats'),
          'Bats are the only mammals capable of true and sustained flight.',
          'The mammal capable of true flight is'),
    Entry('French Revolution', 'history', 'In which year did the French Revolution begin?',
          ('1789',),
          'The French Revolution began in 1789 with the storming of the Bastille on 14 July.',
          'The year the French Revolution began is'),
    Entry('Moon landing', 'history', 'In which year did humans first land on the Moon?',
          ('1969',),
          'Apollo 11 landed the first humans on the Moon on 20 July 1969.',
          'The year humans first landed on the Moon is'),
    Entry('World War I', 'history', 'In which year did World War I begin?',
          ('1914',),
          'World War I began in 1914 and ended in 1918.',
          'The year World War I began is'),
    Entry('Christopher Columbus', 'history', 'In which year did Christopher Columbus first reach the Americas?',
          ('1492',),
          'Christopher Columbus first reached the Americas in 1492.',
          'The year Christopher Columbus first reached the Americas is'),
    Entry('Battle of Hastings', 'history', 'In which year was the Battle of Hastings fought?',
          ('1066',),
          'The Battle of Hastings was fought on 14 October 1066.',
          'The year the Battle of Hastings was fought is'),
    Entry('Declaration of Independence', 'history',
          'In which year was the United States Declaration of Independence signed?',
          ('1776',),
          'The United States Declaration of Independence was adopted on 4 July 1776.',
          'The year the United States Declaration of Independence was signed is'),
    Entry('Julius Caesar', 'history', 'In which year was Julius Caesar assassinated?',
          ('44 BC', '44'),
          'Julius Caesar was assassinated in Rome on the Ides of March, 44 BC.',
          'The year Julius Caesar was assassinated is'),
    Entry('Napoleon', 'history', 'In which battle was Napoleon finally defeated in 1815?',
          ('Waterloo', 'Battle of Waterloo'),
          'Napoleon Bonaparte was finally defeated at the Battle of Waterloo in 1815.',
          'The battle where Napoleon was finally defeated in 1815 is'),
    Entry('George Washington', 'history', 'Who was the first president of the United States?',
          ('George Washington', 'Washington'),
          'George Washington was the first president of the United States, from 1789 to 1797.',
          'The first president of the United States is'),
    Entry('Abraham Lincoln', 'history', 'Which US president issued the Emancipation Proclamation?',
          ('Abraham Lincoln', 'Lincoln'),
          'Abraham Lincoln issued the Emancipation Proclamation in 1863.',
          'The US president who issued the Emancipation Proclamation is'),
    Entry('Soviet Union', 'history', 'In which year did the Soviet Union dissolve?',
          ('1991',),
          'The Soviet Union was formally dissolved in December 1991.',
          'The year the Soviet Union dissolved is'),
    Entry('Yuri Gagarin', 'history', 'Who was the first human in space?',
          ('Yuri Gagarin', 'Gagarin'),
          'Yuri Gagarin became the first human in space aboard Vostok 1 on 12 April 1961.',
          'The first human in space is'),
    Entry('Pi', 'numbers', 'What is the value of pi to two decimal places?',
          ('3.14',),
          "Pi, the ratio of a circle's circumference to its diameter, is approximately 3.14 (3.14159 "
          "to five decimals).",
          'The value of pi to two decimal places is'),
    Entry('Octagon', 'numbers', 'How many sides does an octagon have?',
          ('8', 'eight'),
          'An octagon is a polygon with eight sides.',
          'The number of sides of an octagon is'),
    Entry('Dozen', 'numbers', 'How many items are in a dozen?',
          ('12', 'twelve'),
          'A dozen is a group of twelve.',
          'The number of items in a dozen is'),
    Entry('Century', 'numbers', 'How many years are in a century?',
          ('100', 'one hundred'),
          'A century is a period of 100 years.',
          'The number of years in a century is'),
    Entry('Kilometre', 'numbers', 'How many metres are in a kilometre?',
          ('1000', '1,000', 'one thousand'),
          'A kilometre is a unit of length equal to 1,000 metres.',
          'The number of metres in a kilometre is'),
    Entry('Absolute zero', 'numbers', 'What is absolute zero in degrees Celsius?',
          ('-273.15', '-273'),
          'Absolute zero, the lowest possible temperature, is -273.15 degrees Celsius.',
          'Absolute zero in degrees Celsius is'),
    Entry('Speed of light', 'numbers', 'Roughly how many kilometres per second does light travel in a vacuum?',
          ('300,000', '300000', '299,792'),
          'The speed of light in a vacuum is 299,792 kilometres per second.',
          'The speed of light in a vacuum in kilometres per second is'),
    Entry('Right angle', 'numbers', 'How many degrees are in a right angle?',
          ('90', 'ninety'),
          'A right angle is an angle of exactly 90 degrees.',
          'The number of degrees in a right angle is'),
    Entry('Triangle', 'numbers', 'What do the angles of a triangle add up to, in degrees?',
          ('180',),
          'The interior angles of a triangle add up to 180 degrees.',
          'The sum of the angles of a triangle in degrees is'),
    Entry('Marathon', 'numbers', 'How long is a marathon in kilometres, roughly?',
          ('42', '42.195'),
          'A marathon is a long-distance race of 42.195 kilometres.',
          'The length of a marathon in kilometres is'),
    Entry('Chess', 'culture', 'How many squares are on a chessboard?',
          ('64', 'sixty-four'),
          'A chessboard has 64 squares arranged in an eight-by-eight grid.',
          'The number of squares on a chessboard is'),
    Entry('Olympic Games', 'culture', 'How many rings are on the Olympic flag?',
          ('5', 'five'),
          'The Olympic flag shows five interlocking rings.',
          'The number of rings on the Olympic flag is'),
    Entry('Football', 'culture', 'How many players does a football (soccer) team have on the field?',
          ('11', 'eleven'),
          'In association football each team has eleven players on the field.',
          'The number of players a football team has on the field is'),
    Entry('Rainbow', 'culture', 'How many colours are traditionally named in a rainbow?',
          ('7', 'seven'),
          'A rainbow is traditionally described with seven colours, from red to violet.',
          'The number of colours traditionally named in a rainbow is'),
    Entry('Esperanto', 'culture', 'Who created the language Esperanto?',
          ('L. L. Zamenhof', 'Zamenhof'),
          'Esperanto is a constructed language created by L. L. Zamenhof in 1887.',
          'The creator of the language Esperanto is'),
    Entry('Haiku', 'culture', 'How many syllables does a traditional haiku have?',
          ('17', 'seventeen'),
          'A traditional haiku has 17 syllables in three lines of five, seven and five.',
          'The number of syllables in a traditional haiku is'),
    Entry('Statue of Liberty', 'culture', 'Which country gave the Statue of Liberty to the United States?',
          ('France',),
          'The Statue of Liberty was a gift from the people of France to the United States, dedicated in 1886.',
          'The country that gave the Statue of Liberty to the United States is'),
)


def documents() -> list[Document]:
    """One document per entry, in order: what a search environment over this domain indexes."""
    return [Document(e.title, e.text) for e in ENTRIES]


def entries(split: str = "all") -> list[Entry]:
    """The entries of a split: "train" (4 of every 5), "heldout" (every fifth) or "all"."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    return [e for i, e in enumerate(ENTRIES)
            if split == "all" or (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == (split == "heldout")]


def examples(kinds: Mapping[str, str] | None = None, split: str = "all") -> list[QAExample]:
    """The questions of a split as `QAExample`s (id "general/<title>"); `kinds` maps an id to
    memory/lookup (what the base model knows: `kinds_from_memory`), lookup where it is not given."""
    kinds = kinds or {}
    out = []
    for e in entries(split):
        ex_id = f"general/{e.title}"
        out.append(QAExample(ex_id, e.question, e.answers, kinds.get(ex_id, LOOKUP), e.type, hops=(e.title,)))
    return out


def kinds_from_memory(path: str | Path) -> dict[str, str]:
    """id -> memory/lookup from a `python -m experiments.measure_memory --questions ... --out PATH` file:
    memory iff the base model's closed-book greedy reply held a gold answer."""
    results = json.loads(Path(path).read_text())["results"]
    return {qid: MEMORY if r["greedy_correct"] else LOOKUP for qid, r in results.items()
            if qid.startswith("general/")}


def main(argv: Sequence[str] | None = None) -> None:
    from data.questions import write_questions

    ap = argparse.ArgumentParser(description="Write data.general_qa's questions as a question file (data.questions).")
    ap.add_argument("--out", required=True, help="the .jsonl to write")
    ap.add_argument("--split", choices=SPLITS, default="all")
    ap.add_argument("--memory", default=None, help="a measure_memory file: kinds from it (default: all lookup)")
    args = ap.parse_args(argv)
    rows = examples(kinds_from_memory(args.memory) if args.memory else None, args.split)
    write_questions(rows, args.out)
    print(f"wrote {len(rows)} questions ({sum(r.kind == MEMORY for r in rows)} memory) to {args.out}")


if __name__ == "__main__":
    main()

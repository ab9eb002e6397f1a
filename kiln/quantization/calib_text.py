"""The default calibration and held-out text: plain English prose written for kiln and dedicated to the
public domain (CC0). It is a Python string so it ships with the package and nothing downloads. The two parts
never share a paragraph, so the quality report measures text the calibration did not see."""

CALIBRATION = """\
The river rises in the hills to the north, where the snow lies late into spring. In April the water runs cold and fast, carrying branches and the brown silt of the upper valley. By midsummer it slows and widens, and children from the villages along its banks wade into the shallows to catch small fish with their hands. The old bridge at the market town has stood for three hundred years; its arches were built of the same grey stone as the church, and the masons who raised it cut their marks into the blocks where they can still be seen.

A baker begins work long before dawn. The dough for the first loaves was mixed the evening before and left to rise slowly in the cool of the back room. In the dark she shapes it, scores the tops with a thin blade, and slides the loaves into the oven on a long wooden paddle. The smell reaches the street before the first customers do. By seven o'clock the shelves are full, and by noon most of them are empty again.

To measure the height of a tree without climbing it, stand at a distance from the trunk and hold a stick upright at arm's length. Walk backward or forward until the top of the stick lines up with the top of the tree and your hand lines up with its base. Then turn the stick sideways, keeping your hand at the base, and have a friend walk out from the trunk until they reach the point where the tip of the stick falls. The distance from the trunk to your friend is the height of the tree.

The committee met on Tuesday to discuss the budget for the coming year. The treasurer reported that income from membership fees had risen slightly, while the cost of heating the hall had almost doubled. After a long discussion the members agreed to postpone the repairs to the roof until the autumn, to hold a second fair in the spring, and to ask the council whether a grant might be available for the new windows. The meeting closed at half past nine.

Light travels through empty space at a speed of nearly three hundred thousand kilometres each second. When it passes from air into water or glass it slows down, and if it enters at an angle it bends. This bending is called refraction, and it is the reason a straight stick looks broken where it enters a pond. A prism bends each colour of light by a slightly different amount, which is why white sunlight passing through it spreads into a band of colours from red to violet.

Once there was a fox who lived at the edge of a wheat field. Every evening he watched the farmer's hens walking in a line from the barn to the coop, and every evening he counted them. One night he counted eleven instead of twelve, and he was so troubled by the missing hen that he forgot to be hungry. He searched the hedge and the ditch and the long grass by the road, and at last he found her asleep in an old boot by the gate. He carried the boot back to the coop and left it there, and no one ever understood how it had come to be on the step.

A good recipe for vegetable soup begins with an onion, two carrots and a stick of celery, chopped small and cooked gently in butter until soft. Add a few potatoes cut into cubes, a handful of lentils, and enough stock to cover everything by two fingers. Simmer for half an hour, season with salt and pepper, and stir in a spoonful of chopped parsley at the end. The soup is better on the second day, when the flavours have had time to settle.

The harbour was busy from the first light. Fishing boats came in with their catch packed in ice, and the buyers walked along the quay, lifting the lids of the boxes and calling out prices. Gulls circled overhead and settled on the mooring posts whenever the men turned their backs. By mid morning the auction was over, the lorries had left for the city, and the crews sat on upturned crates mending their nets in the sun.

In a well kept library every book has a place, and the place is written on the spine. Books on the same subject stand together, so that a reader who finds one useful volume will often find three more on the shelf beside it. The catalogue lists each book by its author, its title and its subject, and a patient librarian can usually find what a visitor wants even when the visitor cannot remember the name of the book or the name of the person who wrote it.

Walking in the mountains calls for care in every season. The weather can change within an hour, and a clear morning may turn into an afternoon of cloud and rain. Carry a map and a compass, warm clothing, water and something to eat, and tell someone where you are going and when you expect to be back. Keep to the marked paths where the ground is steep, and turn back early rather than late if the light begins to fail.

The first clocks were driven by falling weights and kept time poorly, gaining or losing many minutes in a day. The pendulum changed that. A pendulum of a given length swings back and forth in almost exactly the same time whether its swings are wide or narrow, and a clock that counts those swings can keep time to within a few seconds a day. Later the balance spring made small and portable watches possible, and sailors used accurate clocks to find their longitude at sea.

The garden behind the house was small but carefully planned. Along the south wall grew pears and plums trained flat against the warm brick. Beds of beans, peas and lettuce filled the middle, and a row of currant bushes separated them from the compost heap and the shed. Every spring the owner wrote down what she had planted and where, so that the same crop never grew in the same bed two years in a row.

Numbers that can be divided only by one and by themselves are called prime numbers. The first few are two, three, five, seven, eleven and thirteen. There are infinitely many of them, a fact proved more than two thousand years ago by a simple argument: multiply any list of primes together and add one, and the result is not divisible by any prime on the list, so there must be another prime that the list left out.
"""

HELDOUT = """\
The train left the station a few minutes late and ran slowly through the suburbs, past back gardens, allotments and the long grey walls of warehouses. Beyond the last houses the country opened out into flat green fields crossed by ditches and lines of willows. A woman in the corner seat read a newspaper, folding it smaller and smaller as she went, while a boy across the aisle pressed his face to the window and counted the cows.

Bees live in colonies that may hold tens of thousands of workers and a single queen. The workers gather nectar and pollen from flowers, build the wax comb, feed the young and guard the entrance of the hive. A worker that finds a rich patch of flowers returns and performs a dance on the comb, and the angle and length of the dance tell the other bees in which direction the flowers lie and how far away they are.

When the snow came it fell all night without a sound. In the morning the lane had disappeared, the hedges were soft white walls, and the only marks in the field were the small neat prints of a bird that had walked in a circle and then flown away. The children were out before breakfast, and by nine o'clock there was a snowman by the gate wearing a scarf, a pair of gloves and a flowerpot for a hat.

To keep a wooden table in good condition, wipe it with a damp cloth rather than a wet one, and dry it at once. Hot dishes should stand on a mat, because heat leaves pale rings in the finish that are hard to remove. Once or twice a year the surface can be cleaned with a little soap and water and then rubbed with a thin coat of wax, which is polished off with a soft dry cloth after it has had a few minutes to harden.

The story is told of a scholar who spent forty years writing a history of his town. He visited every church and every farm, copied every record he could find, and talked with the oldest people in every street. When at last the book was finished he found that the town had changed so much while he was writing that he had to begin a second volume at once, and he was still working on it on the day he died.

A simple electric circuit needs a source of current, such as a battery, a path for the current to follow, and something that uses the energy, such as a lamp. If the path is broken anywhere the current stops and the lamp goes out. A switch is nothing more than a convenient way of breaking and joining the path, and a fuse is a thin piece of wire that melts and breaks the path if too much current flows.
"""

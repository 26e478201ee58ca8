"""The table of search texts and the date filter each one gives, at a pinned now (docs/dates.md shows it).

Rows: (text, what CLIP reads, taken_after, taken_before); dates are midnights, None is an open end.
"""

from __future__ import annotations

import datetime

NOW = datetime.datetime(2024, 3, 15, 12, 0)  # a Friday
NO_DATE = (None, None)

Row = tuple[str, str, str | None, str | None]
TABLE: list[Row] = [
    # years
    ("2019", "2019", "2019-01-01", "2020-01-01"),
    ("dogs 2019", "dogs", "2019-01-01", "2020-01-01"),
    ("dog in 2019", "dog", "2019-01-01", "2020-01-01"),
    ("photos from 2019", "photos", "2019-01-01", "2020-01-01"),
    ("during 2019 a wedding", "a wedding", "2019-01-01", "2020-01-01"),
    ("snow since 2019", "snow", "2019-01-01", None),
    ("beach before 2019", "beach", None, "2019-01-01"),
    ("beach after 2019", "beach", "2020-01-01", None),
    ("beach until 2019", "beach", None, "2020-01-01"),
    ("cars from the 1990s", "cars", "1990-01-01", "2000-01-01"),
    ("beach, 2019, sunset", "beach, sunset", "2019-01-01", "2020-01-01"),
    # months
    ("July 2023", "July 2023", "2023-07-01", "2023-08-01"),
    ("fireworks july 2023", "fireworks", "2023-07-01", "2023-08-01"),
    ("may 2019", "may 2019", "2019-05-01", "2019-06-01"),
    ("Mar. 2019 party", "party", "2019-03-01", "2019-04-01"),
    ("dinner, Sept 2020", "dinner", "2020-09-01", "2020-10-01"),
    ("snow in january of 2021", "snow", "2021-01-01", "2021-02-01"),
    ("Christmas December 2019", "Christmas", "2019-12-01", "2020-01-01"),
    ("snow in December", "snow", "2023-12-01", "2024-01-01"),
    ("kids in may", "kids", "2023-05-01", "2023-06-01"),
    ("flowers in March", "flowers", "2024-03-01", "2024-04-01"),
    ("cake since february", "cake", "2024-02-01", None),
    ("2019-07", "2019-07", "2019-07-01", "2019-08-01"),
    ("party 2019-07-14", "party", "2019-07-14", "2019-07-15"),
    # seasons: meteorological, northern hemisphere
    ("beach summer 2019", "beach", "2019-06-01", "2019-09-01"),
    ("winter 2019", "winter 2019", "2019-12-01", "2020-03-01"),
    ("spring 2020 blossoms", "blossoms", "2020-03-01", "2020-06-01"),
    ("leaves in the fall of 2018", "leaves", "2018-09-01", "2018-12-01"),
    ("autumn 2018", "autumn 2018", "2018-09-01", "2018-12-01"),
    ("hiking 2019 summer", "hiking", "2019-06-01", "2019-09-01"),
    ("SUMMER 2019 BBQ", "BBQ", "2019-06-01", "2019-09-01"),
    # relative to NOW (Friday 2024-03-15)
    ("last year", "last year", "2023-01-01", "2024-01-01"),
    ("picnic this year", "picnic", "2024-01-01", "2025-01-01"),
    ("this month", "this month", "2024-03-01", "2024-04-01"),
    ("cats last month", "cats", "2024-02-01", "2024-03-01"),
    ("beach last summer", "beach", "2023-06-01", "2023-09-01"),
    ("snow last winter", "snow", "2023-12-01", "2024-03-01"),
    ("garden this summer", "garden", "2024-06-01", "2024-09-01"),
    ("yesterday", "yesterday", "2024-03-14", "2024-03-15"),
    ("dog today", "dog", "2024-03-15", "2024-03-16"),
    ("bikes last week", "bikes", "2024-03-04", "2024-03-11"),
    ("bikes this week", "bikes", "2024-03-11", "2024-03-18"),
    ("tree last december", "tree", "2023-12-01", "2024-01-01"),
    ("tree last february", "tree", "2024-02-01", "2024-03-01"),
    ("cats in the last 3 months", "cats", "2023-12-15", "2024-03-16"),
    ("sunsets in the last 10 days", "sunsets", "2024-03-05", "2024-03-16"),
    ("tulips over the past year", "tulips", "2023-03-15", "2024-03-16"),
    ("running since last summer", "running", "2023-06-01", None),
    # ranges: inclusive years
    ("2018-2020", "2018-2020", "2018-01-01", "2021-01-01"),
    ("between 2018 and 2020", "between 2018 and 2020", "2018-01-01", "2021-01-01"),
    ("from 2018 to 2020", "from 2018 to 2020", "2018-01-01", "2021-01-01"),
    ("boats between 2018 and 2020", "boats", "2018-01-01", "2021-01-01"),
    ("boats from 2018 to 2020", "boats", "2018-01-01", "2021-01-01"),
    ("boats 2018\u20132020", "boats", "2018-01-01", "2021-01-01"),
    ("boats 2020-2018", "boats", "2018-01-01", "2021-01-01"),
    ("snow in 2019 and 2020", "snow", "2019-01-01", "2021-01-01"),
    ("cats 2018 2020", "cats", "2018-01-01", "2021-01-01"),
    # words and numbers that only look like dates stay text
    ("dogs that may bite", "dogs that may bite", *NO_DATE),
    ("may flowers", "may flowers", *NO_DATE),
    ("protest march", "protest march", *NO_DATE),
    ("soldiers march", "soldiers march", *NO_DATE),
    ("march of the penguins", "march of the penguins", *NO_DATE),
    ("soldiers march in 2019", "soldiers march", "2019-01-01", "2020-01-01"),
    ("leaves fall", "leaves fall", *NO_DATE),
    ("spring water", "spring water", *NO_DATE),
    ("summer dress", "summer dress", *NO_DATE),
    ("winter coat", "winter coat", *NO_DATE),
    ("picnic in the summer", "picnic in the summer", *NO_DATE),
    ("summer of 69", "summer of 69", *NO_DATE),
    ("the 80s", "the 80s", *NO_DATE),
    ("1000 lights", "1000 lights", *NO_DATE),
    ("route 66", "route 66", *NO_DATE),
    # a number or a code after its counter word is not a year (bench/load.py's "number 2093" read as one)
    ("a blue circle number 2093", "a blue circle number 2093", *NO_DATE),
    ("SKU 2019 red leather boot", "SKU 2019 red leather boot", *NO_DATE),
    ("room 2001 in 2019", "room 2001", "2019-01-01", "2020-01-01"),
    ("7 eleven", "7 eleven", *NO_DATE),
    ("2 dogs", "2 dogs", *NO_DATE),
    ("1920x1080 wallpaper", "1920x1080 wallpaper", *NO_DATE),
    ("a second dog", "a second dog", *NO_DATE),
    ("cat sat on a mat", "cat sat on a mat", *NO_DATE),
    ("$2000 watch", "$2000 watch", *NO_DATE),
    ("firmware v2.2019", "firmware v2.2019", *NO_DATE),
    ("receipt 2019-02-30", "receipt 2019-02-30", *NO_DATE),
    ("now and then", "now and then", *NO_DATE),
]


def markdown_table() -> str:
    """TABLE as the Markdown table in docs/dates.md."""
    lines = ["| query | CLIP reads | taken_after | taken_before |", "|---|---|---|---|"]
    for text, search_text, after, before in TABLE:
        lines.append(f"| `{text}` | `{search_text}` | {after or '(open)'} | {before or '(open)'} |")
    return "\n".join(lines) + "\n"

#!/usr/bin/env python3
"""Writes N generated contacts as CSV (deterministic for a seed).

contacts.py N OUT.csv [--changed 0.10 --new 0.05 --from BASE.csv-seed]
The changed variant rewrites `changed` of the rows (new score and
updated_at) and appends `new` * N rows with fresh ids.
"""
import argparse
import random

p = argparse.ArgumentParser()
p.add_argument("n", type=int)
p.add_argument("out")
p.add_argument("--changed", type=float, default=0.0)
p.add_argument("--new", type=float, default=0.0)
a = p.parse_args()

cities = ["Berlin", "Lisbon", "Austin", "Osaka", "Lagos", "Lima", "Oslo", "Pune"]
rnd = random.Random(42)
chg = random.Random(7)
with open(a.out, "w") as f:
    f.write("id,email,first_name,last_name,company,city,score,active,created_at,updated_at\n")
    total = a.n + int(a.n * a.new)
    for i in range(1, total + 1):
        day = 1 + rnd.randrange(28)
        score = rnd.randrange(100000) / 100
        active = "true" if rnd.random() < 0.7 else "false"
        city = cities[rnd.randrange(len(cities))]
        updated = f"2024-06-{day:02d}T{rnd.randrange(24):02d}:{rnd.randrange(60):02d}:00Z"
        if i <= a.n and chg.random() < a.changed:
            score = round(score + 1.5, 2)
            updated = f"2024-07-{day:02d}T12:00:00Z"
        f.write(
            f"{i},user{i}@example.com,First{i % 5000},Last{i % 7919},"
            f"Company {i % 997} GmbH,{city},{score},{active},"
            f"2023-01-{day:02d}T08:00:00Z,{updated}\n"
        )

"""Scrapes a node's metrics endpoint and parses it with prometheus_client's text parser, as a
Prometheus server would read it.

usage: scrape_metrics.py URL
Prints one JSON object: {"families": {NAME: {"type": ..., "help": ...}},
"samples": [[SAMPLE_NAME, {LABEL: VALUE}, VALUE], ...]}. A text the parser refuses fails
the script.
"""

import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def main() -> None:
    with urllib.request.urlopen(sys.argv[1], timeout=30) as response:
        content_type = response.headers.get("Content-Type", "")
        text = response.read().decode("utf-8")
    families = {}
    samples = []
    for family in text_string_to_metric_families(text):
        families[family.name] = {"type": family.type, "help": family.documentation}
        for sample in family.samples:
            samples.append([sample.name, sample.labels, sample.value])
    print(json.dumps({"content_type": content_type, "families": families, "samples": samples}))


if __name__ == "__main__":
    main()

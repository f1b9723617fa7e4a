"""The lag benchmark's reader: one search for the documents with a sequence_number at or above
the lowest not seen yet, asked every LAG_POLL_S. Run as a module it asks the same search of a
collection until killed, so that the lag's reference (single upserts) is timed under the load
the reader puts on Typesense while it watches the daemon:

    python -m tests.bench.reader URL API_KEY COLLECTION
"""

import sys
import time
from typing import Any

import httpx

# Pause between two searches. The reader's resolution adds about half its cycle to every lag;
# its searches slow Typesense's writes too (one import took 4.6 ms with this pause against
# 3.2 ms with a 10 ms one), so the reference is timed under the same reader.
LAG_POLL_S = 0.001
PARAMS = {
    "q": "*",
    "query_by": "element_type",
    "sort_by": "sequence_number:asc",
    "per_page": 250,
    "include_fields": "sequence_number",
}


def search(http: httpx.Client, collection: str, lowest: int) -> list[dict[str, Any]]:
    """The documents with sequence_number >= lowest (the first 250)."""
    response = http.get(
        f"/collections/{collection}/documents/search",
        params={**PARAMS, "filter_by": f"sequence_number:>={lowest}"},
    )
    response.raise_for_status()
    return [hit["document"] for hit in response.json()["hits"]]


def client(url: str, api_key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"X-TYPESENSE-API-KEY": api_key})


def main() -> None:
    url, api_key, collection = sys.argv[1:4]
    with client(url, api_key) as http:
        search(http, collection, 2**31 - 1)  # finds nothing, as the watch mostly does
        print("reading", flush=True)
        while True:
            time.sleep(LAG_POLL_S)
            search(http, collection, 2**31 - 1)


if __name__ == "__main__":
    main()

"""The fault proxy's "v30" shape (tests/support/faultproxy.py) against the real 0.24.1 server:
each answer Typesense 29/30 give differently, rewritten as their source writes it, so that the
tests marked `answer_shapes` run the daemon against what a newer server says. The daemon's side
of each is in those tests (docs/guarantees.md lists them)."""

import json
from collections.abc import Iterator

import httpx
import pytest

from outbox_sync.typesense_index import TypesenseIndex
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.typesense import Server

DOCUMENT = {"element_type": "s", "element_id": 1, "sequence_number": 1, "created_at": "x"}


@pytest.fixture
def v30(typesense_server: Server) -> Iterator[FaultProxy]:
    with FaultProxy(typesense_server.url, shape="v30") as proxy:
        yield proxy


@pytest.fixture
def http(typesense_server: Server) -> Iterator[httpx.Client]:
    """Requests with the server's key, to its own URL or the proxy's, whatever they answer."""
    headers = {"X-TYPESENSE-API-KEY": typesense_server.api_key}
    with httpx.Client(headers=headers, timeout=10) as client:
        yield client


def test_a_missing_collection_or_alias_is_worded_as_29_and_30_word_it(
    typesense_server: Server, http: httpx.Client, v30: FaultProxy, collection: str
) -> None:
    documents = f"/collections/{collection}/documents"
    for method, path in [
        ("GET", f"/collections/{collection}"),
        ("GET", f"{documents}/search?q=*"),
        ("GET", f"{documents}/export"),
        ("POST", f"{documents}/import?action=upsert"),
        ("DELETE", f"{documents}?filter_by=id:[1]"),
        ("GET", f"{documents}/1"),
        ("DELETE", f"{documents}/1"),
        ("GET", f"/aliases/{collection}"),
    ]:
        direct = http.request(method, typesense_server.url + path, content=b'{"id":"1"}')
        shaped = http.request(method, v30.url + path, content=b'{"id":"1"}')
        assert direct.status_code == shaped.status_code == 404, path
        assert direct.json()["message"] in ("Not Found", "Not found."), path
        assert shaped.json() == {"message": "Collection not found"}, path
    # what both word alike stays as it is
    dropped = http.request("DELETE", v30.url + f"/collections/{collection}")
    assert dropped.json() == {"message": f"No collection with name `{collection}` found."}


def test_a_missing_document_is_worded_alike_and_ignore_not_found_is_heard(
    typesense_server: Server, http: httpx.Client, v30: FaultProxy, index: TypesenseIndex
) -> None:
    document = f"/collections/{index.collection}/documents/7"
    for url in (typesense_server.url, v30.url):
        missing = http.request("GET", url + document)
        assert (missing.status_code, missing.json()) == (
            404,
            {"message": "Could not find a document with id: 7"},
        )
    ignored = f"{document}?ignore_not_found=true"
    assert http.request("DELETE", typesense_server.url + ignored).status_code == 404
    answer = http.request("DELETE", v30.url + ignored)
    assert (answer.status_code, answer.json()) == (200, {"id": "7"})


def test_a_collection_gains_the_keys_30_writes(
    typesense_server: Server, http: httpx.Client, v30: FaultProxy, index: TypesenseIndex
) -> None:
    path = f"/collections/{index.collection}"
    direct = http.request("GET", typesense_server.url + path).json()
    shaped = http.request("GET", v30.url + path).json()
    assert shaped.keys() - direct.keys() == {"synonym_sets", "curation_sets"}
    assert (shaped["synonym_sets"], shaped["curation_sets"]) == ([], [])
    for before, after in zip(direct["fields"], shaped["fields"], strict=True):
        assert after == before | {"stem": False, "store": True, "stem_dictionary": ""}
    [listed] = [
        c
        for c in http.request("GET", v30.url + "/collections").json()
        if c["name"] == shaped["name"]
    ]
    assert listed == shaped


def test_a_failed_import_line_carries_only_what_the_import_asked_for(
    typesense_server: Server, http: httpx.Client, v30: FaultProxy, index: TypesenseIndex
) -> None:
    good = {"id": "1", **DOCUMENT}
    body = json.dumps(good) + "\n" + json.dumps(good | {"id": "2", "sequence_number": "two"})
    path = f"/collections/{index.collection}/documents/import?action=upsert"
    direct = http.request("POST", typesense_server.url + path, content=body)
    assert "document" in json.loads(direct.text.split("\n")[1])  # 0.24.1 echoes it
    shaped = http.request("POST", v30.url + path, content=body).text.split("\n")
    error = "Field `sequence_number` must be an int32."
    assert shaped == ['{"success":true}', f'{{"code":400,"error":"{error}","success":false}}']
    asked = path + "&return_id=true&return_doc=true"
    failed = json.loads(http.request("POST", v30.url + asked, content=body).text.split("\n")[1])
    assert failed["id"] == "2" and json.loads(failed["document"])["sequence_number"] == "two"


def test_health_names_a_resource_error_while_answering_ok_and_writes_are_refused(
    typesense_server: Server, http: httpx.Client, v30: FaultProxy, index: TypesenseIndex
) -> None:
    assert http.request("GET", v30.url + "/health").json() == {"ok": True}
    v30.add(Fault("resource_error", resource="OUT_OF_MEMORY", times=None))
    answer = http.request("GET", v30.url + "/health")
    assert (answer.status_code, answer.json()) == (
        200,
        {"ok": True, "resource_error": "OUT_OF_MEMORY"},
    )
    path = f"/collections/{index.collection}/documents/import"
    refused = http.request("POST", v30.url + path, content=b'{"id":"1"}')
    assert (refused.status_code, refused.json()) == (
        422,
        {"message": "Rejecting write: running out of resource type: OUT_OF_MEMORY"},
    )
    deleted = http.request("DELETE", v30.url + f"/collections/{index.collection}/documents/1")
    assert deleted.status_code == 404  # a DELETE is let through: the document is not there
    # 0.24.1 refuses the writes alike, and says nothing on /health
    with FaultProxy(typesense_server.url) as old:
        old.add(Fault("resource_error", times=None))
        assert http.request("GET", old.url + "/health").json() == {"ok": True}
        assert http.request("POST", old.url + path, content=b"{}").status_code == 422


def test_an_export_can_carry_the_plain_text_line_30_writes_in_place_of_a_document(
    typesense_server: Server, http: httpx.Client, v30: FaultProxy, index: TypesenseIndex
) -> None:
    lines = "\n".join(json.dumps({"id": str(i), **DOCUMENT}) for i in (1, 2, 3))
    path = f"/collections/{index.collection}/documents"
    imported = http.request("POST", typesense_server.url + f"{path}/import", content=lines)
    assert imported.text.count('"success":true') == 3
    v30.add(Fault("export_error_line", ids={"2"}))
    exported = http.request("GET", v30.url + f"{path}/export").text.split("\n")
    assert exported[1] == "Error while getting seq_id of `2`: Not found."
    assert [json.loads(exported[i])["id"] for i in (0, 2)] == ["1", "3"]

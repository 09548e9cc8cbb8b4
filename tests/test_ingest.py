"""The ingest command and the chunker behind it."""

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from retrieval.ingest import CHUNK_TARGET_CHARACTERS, split_into_chunks
from retrieval.models import Chunk, Connector, Resource

from .helpers import ask

pytestmark = pytest.mark.django_db

PAYROLL_TEXT = """# Payroll calendar

Salaries are paid on the 25th of each month. When the 25th falls on a weekend,
payment moves to the Friday before.

Expense claims submitted by the 10th are paid with the same month's salary.
"""
ONBOARDING_TEXT = "Onboarding\n\nNew starters receive a laptop on their first day.\n"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_sidecar(document, metadata):
    sidecar = document.with_name(document.name + ".meta.json")
    sidecar.write_text(json.dumps(metadata), encoding="utf-8")


def ingest(path, **options):
    options.setdefault("organization", "acme")
    options.setdefault("connector", "wiki")
    output = StringIO()
    call_command("ingest", str(path), stdout=output, **options)
    return output.getvalue()


def wiki_resources():
    return {
        resource.external_id: resource
        for resource in Resource.objects.filter(connector__name="wiki").select_related(
            "owner"
        )
    }


@pytest.fixture
def folder(tmp_path):
    write(tmp_path / "payroll.md", PAYROLL_TEXT)
    write(tmp_path / "people" / "onboarding.txt", ONBOARDING_TEXT)
    write(tmp_path / "people" / "badge.pdf", "not a document type the command reads")
    return tmp_path


# --- loading ------------------------------------------------------------------


def test_folder_loads_resources_and_chunks(demo, folder):
    output = ingest(folder)

    resources = wiki_resources()
    assert sorted(resources) == ["payroll.md", "people/onboarding.txt"]
    assert Chunk.objects.filter(resource__connector__name="wiki").count() >= 2
    assert resources["payroll.md"].chunks.first().text.startswith("# Payroll calendar")
    assert "Loaded 2 documents" in output
    assert "Created connector wiki" in output


def test_options_set_document_metadata(demo, folder):
    ingest(
        folder,
        classification="public",
        labels=["hr", "handbook"],
        owner="bob@acme.test",
    )

    resource = wiki_resources()["payroll.md"]
    assert resource.classification == "public"
    assert resource.labels == ["hr", "handbook"]
    assert resource.owner == demo.bob


def test_defaults_without_options(demo, folder):
    ingest(folder)

    resource = wiki_resources()["people/onboarding.txt"]
    assert resource.classification == "internal"
    assert resource.labels == []
    assert resource.owner is None
    assert resource.title == "Onboarding"


def test_sidecar_overrides_options(demo, folder):
    write_sidecar(
        folder / "payroll.md",
        {
            "title": "Payroll dates",
            "classification": "confidential",
            "labels": ["finance"],
            "owner": "alice@acme.test",
        },
    )

    ingest(folder, classification="public", labels=["hr"], owner="bob@acme.test")

    resources = wiki_resources()
    overridden = resources["payroll.md"]
    assert overridden.title == "Payroll dates"
    assert overridden.classification == "confidential"
    assert overridden.labels == ["finance"]
    assert overridden.owner == demo.alice
    untouched = resources["people/onboarding.txt"]
    assert untouched.classification == "public"
    assert untouched.labels == ["hr"]
    assert untouched.owner == demo.bob


def test_sidecar_sets_external_id(demo, folder):
    write_sidecar(folder / "payroll.md", {"external_id": "hr/payroll-calendar"})

    ingest(folder)

    assert sorted(wiki_resources()) == ["hr/payroll-calendar", "people/onboarding.txt"]


def test_sidecar_file_is_not_a_document(demo, folder):
    write_sidecar(folder / "payroll.md", {"labels": ["finance"]})

    ingest(folder)

    assert len(wiki_resources()) == 2


def test_single_file_uses_its_name(demo, folder):
    ingest(folder / "people" / "onboarding.txt")

    assert sorted(wiki_resources()) == ["onboarding.txt"]


def test_ingest_twice_is_idempotent(demo, folder):
    ingest(folder)
    first_resources = {key: r.id for key, r in wiki_resources().items()}
    first_chunks = Chunk.objects.filter(resource__connector__name="wiki").count()

    output = ingest(folder)

    assert {key: r.id for key, r in wiki_resources().items()} == first_resources
    assert (
        Chunk.objects.filter(resource__connector__name="wiki").count() == first_chunks
    )
    assert (
        Connector.objects.filter(organization=demo.organization, name="wiki").count()
        == 1
    )
    assert "Created connector" not in output


def test_second_run_replaces_metadata(demo, folder):
    ingest(folder, classification="internal")
    write_sidecar(folder / "payroll.md", {"classification": "public"})

    ingest(folder, classification="internal")

    assert wiki_resources()["payroll.md"].classification == "public"


def test_existing_connector_receives_documents(demo, folder):
    ingest(folder, connector="handbook")

    external_ids = set(demo.connector.resources.values_list("external_id", flat=True))
    assert "payroll.md" in external_ids
    assert "q3-board-financials.md" in external_ids


# --- rejected input -----------------------------------------------------------


def add_bad_sidecar(metadata):
    def prepare(folder):
        write_sidecar(folder / "people" / "onboarding.txt", metadata)

    return prepare


def add_bytes(name, data):
    def prepare(folder):
        (folder / name).write_bytes(data)

    return prepare


def add_text(name, text):
    def prepare(folder):
        write(folder / name, text)

    return prepare


REJECTED_INPUTS = [
    pytest.param(
        add_bad_sidecar({"classification": "secret"}), "secret", id="classification"
    ),
    pytest.param(add_bad_sidecar({"tags": ["hr"]}), "tags", id="unknown-key"),
    pytest.param(
        add_bad_sidecar({"owner": "nobody@acme.test"}), "nobody", id="unknown-owner"
    ),
    pytest.param(add_bad_sidecar({"labels": "hr"}), "list", id="labels-not-list"),
    pytest.param(
        add_bad_sidecar({"labels": ["has space"]}), "has space", id="invalid-label"
    ),
    pytest.param(
        add_bad_sidecar({"external_id": None}), "external_id", id="null-external-id"
    ),
    pytest.param(
        add_bad_sidecar({"external_id": ""}), "external_id", id="empty-external-id"
    ),
    pytest.param(add_bad_sidecar({"title": ["a"]}), "title", id="title-not-text"),
    pytest.param(
        add_bad_sidecar({"external_id": "payroll.md"}),
        "payroll.md",
        id="duplicate-external-id",
    ),
    pytest.param(add_bad_sidecar(["hr"]), "JSON object", id="sidecar-not-object"),
    pytest.param(
        add_text("people/onboarding.txt.meta.json", "{labels: hr}"),
        "JSON",
        id="sidecar-not-json",
    ),
    pytest.param(
        add_bytes("latin1.txt", "Café menu".encode("latin-1")), "UTF-8", id="not-utf8"
    ),
    pytest.param(add_text("blank.md", "  \n\n "), "empty", id="empty-document"),
]


@pytest.mark.parametrize(("prepare", "named"), REJECTED_INPUTS)
def test_invalid_input_writes_nothing(demo, folder, prepare, named):
    prepare(folder)
    resources_before = Resource.objects.count()
    chunks_before = Chunk.objects.count()

    with pytest.raises(CommandError, match=named):
        ingest(folder)

    assert not Connector.objects.filter(name="wiki").exists()
    assert Resource.objects.count() == resources_before
    assert Chunk.objects.count() == chunks_before


def test_unknown_owner_option_writes_nothing(demo, folder):
    with pytest.raises(CommandError, match="nobody@acme.test"):
        ingest(folder, owner="nobody@acme.test")

    assert not Connector.objects.filter(name="wiki").exists()


def test_rejected_rerun_keeps_earlier_load(demo, folder):
    ingest(folder)
    chunks_before = Chunk.objects.count()
    write_sidecar(folder / "payroll.md", {"classification": "secret"})

    with pytest.raises(CommandError):
        ingest(folder)

    assert wiki_resources()["payroll.md"].classification == "internal"
    assert Chunk.objects.count() == chunks_before


def test_empty_folder_is_rejected(demo, tmp_path):
    with pytest.raises(CommandError, match="No .txt or .md files"):
        ingest(tmp_path)


def test_folder_without_documents_is_rejected(demo, tmp_path):
    write(tmp_path / "scan.pdf", "not read")

    with pytest.raises(CommandError, match="No .txt or .md files"):
        ingest(tmp_path)


def test_missing_path_is_rejected(demo, tmp_path):
    with pytest.raises(CommandError, match="neither a file nor a folder"):
        ingest(tmp_path / "missing")


def test_unknown_organization_is_rejected(demo, folder):
    with pytest.raises(CommandError, match="initech"):
        ingest(folder, organization="initech")


# --- split_into_chunks --------------------------------------------------------

SENTENCE = "The on-call engineer acknowledges a page within ten minutes. "
CHUNKING_TEXTS = [
    pytest.param("One short paragraph.", id="short"),
    pytest.param(
        "\n\n".join(f"Paragraph {n}. " + SENTENCE * 2 for n in range(30)),
        id="paragraphs",
    ),
    pytest.param(SENTENCE * 60, id="one-long-paragraph"),
    pytest.param(" ".join(f"word{n}" for n in range(600)), id="no-sentence-ends"),
    pytest.param(
        "\n".join(f"line{n} of the list" for n in range(200)), id="single-newlines"
    ),
    pytest.param(
        "\n".join(f"item{n}" for n in range(400)), id="newline-separated-words"
    ),
    pytest.param("\t".join(f"cell{n}" for n in range(400)), id="tab-separated-words"),
    pytest.param("# Title\r\n\r\n" + "Windows line ends. " * 100, id="crlf"),
]


@pytest.mark.parametrize("text", CHUNKING_TEXTS)
def test_chunks_keep_every_word(text):
    chunks = split_into_chunks(text)

    assert " ".join(chunks).split() == text.split()


@pytest.mark.parametrize("text", CHUNKING_TEXTS)
def test_chunks_never_exceed_target(text):
    chunks = split_into_chunks(text)

    assert max(len(chunk) for chunk in chunks) <= CHUNK_TARGET_CHARACTERS


@pytest.mark.parametrize("target", [40, 200, 800])
def test_smaller_target_gives_more_chunks(target):
    text = SENTENCE * 60

    chunks = split_into_chunks(text, target=target)

    assert len(chunks) >= len(text) // target
    assert max(len(chunk) for chunk in chunks) <= target


def test_overlong_word_is_cut_at_target():
    word = "x" * 250

    chunks = split_into_chunks(f"before {word} after", target=100)

    assert max(len(chunk) for chunk in chunks) <= 100
    assert "".join(chunks).replace(" ", "") == f"before{word}after"


def test_short_paragraphs_are_merged():
    chunks = split_into_chunks("First.\n\nSecond.\n\nThird.")

    assert chunks == ["First.\n\nSecond.\n\nThird."]


def test_blank_text_gives_no_chunks():
    assert split_into_chunks(" \n\n \n") == []


# --- answers from an ingested document ----------------------------------------


def test_ingested_document_is_answerable(demo, api_client, openai_server, tmp_path):
    write(
        tmp_path / "cafeteria.md",
        "# Cafeteria\n\nThe cafeteria serves ramen every Thursday at noon.\n",
    )
    write(
        tmp_path / "kitchen-budget.md",
        "# Kitchen budget\n\nThe cafeteria ramen budget is 9,000 dollars a quarter.\n",
    )
    write_sidecar(tmp_path / "cafeteria.md", {"classification": "public"})
    ingest(tmp_path, classification="restricted", labels=["finance"])
    public = wiki_resources()["cafeteria.md"]

    response = ask(
        api_client,
        demo,
        demo.bob,
        query="When does the cafeteria serve ramen?",
        connector_id="wiki",
    )

    assert response.status_code == 200
    body = response.json()
    assert body["outcome"] == "answered"
    assert {c["resource_id"] for c in body["citations"]} == {str(public.id)}
    assert "Thursday" in body["answer"]
    assert body["denied_chunks"] == 1

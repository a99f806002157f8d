"""Upload: one file or multipart with an activity part; files come back at their contentUrl."""

from __future__ import annotations

import json

import requests

from tests.emulator.conftest import DirectLineCalls, error_of

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def test_single_file_upload_becomes_an_activity_whose_file_is_served_back(dl):
    cid = dl.start()["conversationId"]
    response = dl.call("POST", f"/conversations/{cid}/upload", params={"userId": "dl_alice"}, data=PNG,
                       headers={"Content-Type": "image/png", "Content-Disposition": 'attachment; filename="cat.png"'})
    assert response.status_code == 200, response.text
    activity = dl.all_activities(cid)[0]
    assert activity["id"] == response.json()["id"]
    assert activity["from"]["id"] == "dl_alice"
    (attachment,) = activity["attachments"]
    assert attachment["contentType"] == "image/png" and attachment["name"] == "cat.png"
    served = requests.get(attachment["contentUrl"], timeout=10)
    assert served.status_code == 200 and served.content == PNG
    assert served.headers["Content-Type"] == "image/png"
    assert "cat.png" in dl.wait_for_bot(cid, 1)[0]["text"]


def test_multipart_upload_with_activity_part_and_two_files(dl):
    cid = dl.start()["conversationId"]
    activity = {"type": "message", "from": {"id": "dl_bob"}, "text": "two files",
                "channelData": {"clientActivityID": "up-1"}}
    files = [
        ("activity", ("blob", json.dumps(activity), "application/vnd.microsoft.activity")),
        ("file", ("a.txt", b"first file", "text/plain")),
        ("file", ("b.png", PNG, "image/png")),
    ]
    response = dl.call("POST", f"/conversations/{cid}/upload", params={"userId": "dl_bob"}, files=files)
    assert response.status_code == 200, response.text
    stored = dl.all_activities(cid)[0]
    assert stored["text"] == "two files" and stored["channelData"] == {"clientActivityID": "up-1"}
    assert [(a["name"], a["contentType"]) for a in stored["attachments"]] == [("a.txt", "text/plain"),
                                                                             ("b.png", "image/png")]
    assert [requests.get(a["contentUrl"], timeout=10).content for a in stored["attachments"]] == [b"first file", PNG]


def test_upload_needs_a_user_and_a_file(dl):
    cid = dl.start()["conversationId"]
    no_user = dl.call("POST", f"/conversations/{cid}/upload", data=b"x", headers={"Content-Type": "text/plain"})
    assert error_of(no_user) == (400, "MissingProperty")
    no_file = dl.call("POST", f"/conversations/{cid}/upload", params={"userId": "dl_u"}, data=b"",
                      headers={"Content-Type": "text/plain"})
    assert error_of(no_file) == (400, "BadArgument")
    assert dl.all_activities(cid) == []


def test_upload_over_the_limit_is_413(start_emulator):
    dl = DirectLineCalls(start_emulator(extra_args=("--max-upload-bytes", "1000")).base_url)
    cid = dl.start()["conversationId"]
    response = dl.call("POST", f"/conversations/{cid}/upload", params={"userId": "dl_u"}, data=PNG,
                       headers={"Content-Type": "image/png"})
    assert error_of(response) == (413, "MessageSizeTooBig")


def test_files_of_a_forgotten_conversation_are_gone(dl, directline_emulator):
    cid = dl.start()["conversationId"]
    dl.call("POST", f"/conversations/{cid}/upload", params={"userId": "dl_u"}, data=b"data",
            headers={"Content-Type": "text/plain"})
    url = dl.all_activities(cid)[0]["attachments"][0]["contentUrl"]
    directline_emulator.forget(cid)
    assert error_of(requests.get(url, timeout=10)) == (404, "BadArgument")

"""The embedded store keeps everything across a restart of the service."""

from __future__ import annotations

from pathlib import Path

from conversational_core.app import create_app
from tests.conftest import make_settings
from tests.fixtures.app import app_client, auth


async def test_restart_keeps_everything(tmp_path: Path) -> None:
    settings = make_settings(DATA_DIR=str(tmp_path / "data"))
    alice = auth(settings, "alice")
    async with app_client(create_app(settings)) as client:
        cid = (await client.post("/conversations", headers=alice, json={"title": "kept"})).json()[
            "id"
        ]
        for i in range(3):
            await client.post(
                f"/conversations/{cid}/messages",
                headers=alice,
                json={"content": f"m{i}", "respond": False},
            )
        await client.put(f"/conversations/{cid}", headers=alice, json={"title": "kept!"})
        before = (await client.get(f"/conversations/{cid}/messages", headers=alice)).json()

    async with app_client(create_app(settings)) as client:
        conv = (await client.get(f"/conversations/{cid}", headers=alice)).json()
        assert conv["title"] == "kept!" and conv["message_count"] == 3
        after = (await client.get(f"/conversations/{cid}/messages", headers=alice)).json()
        assert after == before
        assert [m["content"] for m in after["items"]] == ["m0", "m1", "m2"]
        listed = (await client.get("/conversations", headers=alice)).json()["items"]
        assert [c["id"] for c in listed] == [cid]

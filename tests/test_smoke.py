from support import api, connect, token


async def test_publish_reaches_subscriber(port):
    client = await connect(port, token("alice", topics=["news.>"]))
    await client.send({"type": "subscribe", "topic": "news.sport", "ref": 1})
    subscribed = await client.expect("subscribed")
    assert subscribed["ref"] == 1 and subscribed["seq"] == 0 and subscribed["recovered"] is True
    status, body = await api(port, "POST", "/api/publish", {"topic": "news.sport", "data": {"goal": 1}})
    assert status == 200, body
    message = await client.expect("message")
    assert message["seq"] == 1 and message["data"] == {"goal": 1} and message["id"] == body["id"]
    client.close()

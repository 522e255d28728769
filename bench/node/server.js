// node server.js ws|socketio PORT REDIS_URL PREFIX: a Node.js anchor of the fan-out benchmark, one process.
//
// The rival design of the seed: Node.js beside Django holds the websockets. A publish is `POST
// /api/publish/<channel>` (bearer key, as docs/protocol.md), PUBLISHed on Redis; one ioredis subscriber
// relays each message to every socket of its channel: `ws` sockets on /ws/?channel=C, or a Socket.IO 4
// room (an event "message" carrying the protocol's JSON). A socket gets {"type":"subscribed"} once the
// Redis SUBSCRIBE is confirmed, so it gets every later message. GET /probe/ answers once Redis is up.
"use strict";
const http = require("node:http");
const Redis = require("ioredis");

const [kind, port, redisUrl, prefix] = process.argv.slice(2);
const apiKey = process.env.API_KEY;
const pub = new Redis(redisUrl);
const sub = new Redis(redisUrl);
const subscribed = new Map(); // channel -> Promise of its SUBSCRIBE
let ms = 0;
let seq = 0;

function subscribe(channel) {
  if (!subscribed.has(channel)) subscribed.set(channel, sub.subscribe(prefix + channel));
  return subscribed.get(channel).then(() => ({ type: "subscribed", channel, last_id: null, recovered: true }));
}

function publish(req, res, channel) {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    if (req.headers.authorization !== `Bearer ${apiKey}`) return res.writeHead(401).end();
    const body = Buffer.concat(chunks).toString();
    try {
      JSON.parse(body);
    } catch {
      return res.writeHead(400).end();
    }
    const now = Date.now();
    [ms, seq] = now > ms ? [now, 0] : [ms, seq + 1];
    const id = `${ms}-${seq}`;
    const text = `{"type":"message","channel":${JSON.stringify(channel)},"id":"${id}","data":${body}}`;
    pub.publish(prefix + channel, text).then(() => res.end(`{"id":"${id}"}`), () => res.writeHead(503).end());
  });
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  if (req.method === "POST" && url.pathname.startsWith("/api/publish/")) {
    return publish(req, res, decodeURIComponent(url.pathname.slice(13)));
  }
  if (url.pathname === "/probe/" && pub.status === "ready" && sub.status === "ready") return res.end("ok");
  res.writeHead(404).end(); // Socket.IO answers its own /socket.io/ requests before this handler
});

if (kind === "ws") {
  const { WebSocketServer } = require("ws");
  const rooms = new Map(); // channel -> Set of sockets
  const wss = new WebSocketServer({ server, path: "/ws/" });
  wss.on("connection", (ws, req) => {
    const channel = new URL(req.url, "http://x").searchParams.get("channel");
    if (!rooms.has(channel)) rooms.set(channel, new Set());
    rooms.get(channel).add(ws);
    ws.on("close", () => rooms.get(channel).delete(ws));
    subscribe(channel).then((reply) => ws.send(JSON.stringify(reply)));
  });
  sub.on("messageBuffer", (name, data) => {
    // as ws's broadcast example: the same Buffer to every socket (a string would be encoded once per socket)
    for (const ws of rooms.get(name.toString().slice(prefix.length)) || []) ws.send(data, { binary: false });
  });
} else {
  const { Server } = require("socket.io");
  const io = new Server(server, { transports: ["websocket"] });
  io.on("connection", (socket) => {
    const channel = socket.handshake.query.channel;
    socket.join(channel);
    subscribe(channel).then((reply) => socket.emit("message", reply));
  });
  sub.on("message", (name, text) => io.to(name.slice(prefix.length)).emit("message", JSON.parse(text)));
}
server.listen({ port: Number(port), host: "127.0.0.1", backlog: 1024 });

/*
 * Demo room page: chat with its members (presence), notifications, live server stats and an echo panel,
 * all built on OffloadClient (offload/static/offload/offload.js).
 */
(function () {
  'use strict';

  const $ = (selector) => document.querySelector(selector);
  const config = JSON.parse($('#offload-config').textContent);
  const compareIds = OffloadClient.compareIds;

  const STATS_TTL = 10000;      // drop worker rows not updated for this long
  const TYPING_EVERY = 2000;    // at most one "typing" call per this many ms while typing
  const TYPING_SHOWN = 4000;    // a "<user> is typing…" notice lasts this long without news
  const MAX_MESSAGES = 500;     // keep the DOM small
  const MAX_NOTIFICATIONS = 100;
  const MAX_ECHOES = 100;

  // ------------------------------------------------------------ helpers

  /** Creates an element with a class and optional text (always textContent, never HTML). */
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text != null) node.textContent = String(text);
    return node;
  }

  /** A <time> element showing HH:MM for an ISO timestamp. */
  function timeEl(iso) {
    return localTime(el('time', 'time'), iso);
  }

  /** Shows `node` (a <time>) as HH:MM of `iso` in the browser's time zone. */
  function localTime(node, iso) {
    const date = iso ? new Date(iso) : null;
    if (date && !isNaN(date)) {
      node.dateTime = date.toISOString();
      node.textContent = date.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'});
      node.title = date.toLocaleString();
    }
    return node;
  }

  /** Inserts `li` (with data-id) into `list` keeping id order; newest last unless `newestFirst`. */
  function insertById(list, li, newestFirst) {
    const id = li.dataset.id;
    if (newestFirst) {
      let node = list.firstElementChild;
      while (node && compareIds(node.dataset.id, id) > 0) node = node.nextElementSibling;
      list.insertBefore(li, node);
    } else {
      let before = null;
      let node = list.lastElementChild;
      while (node && compareIds(node.dataset.id, id) > 0) {
        before = node;
        node = node.previousElementSibling;
      }
      list.insertBefore(li, before);
    }
  }

  /** Shows `text` in an inline error element, or hides it when text is empty. */
  function showInline(node, text) {
    node.textContent = text || '';
    node.hidden = !text;
  }

  function csrfToken() {
    const input = document.querySelector('input[name="csrfmiddlewaretoken"]');
    if (input && input.value) return input.value;
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : '';
  }

  /**
   * POSTs form fields with the CSRF header and returns the JSON reply.
   * Throws an Error with a readable message (and .code/.status) on any failure.
   */
  async function post(url, fields) {
    let response;
    try {
      response = await fetch(url, {
        method: 'POST',
        credentials: 'same-origin',
        headers: {
          'X-CSRFToken': csrfToken(),
          'X-Requested-With': 'XMLHttpRequest',
          'Accept': 'application/json',
        },
        body: fields ? new URLSearchParams(fields) : undefined,
      });
    } catch (err) {
      throw new Error('Network error: the server could not be reached.');
    }
    let payload = null;
    try {
      payload = await response.json();
    } catch (err) { /* not JSON */ }
    if (response.ok && payload && payload.error == null) return payload;
    let message;
    if (payload && (payload.reason || payload.error)) {
      message = payload.reason || payload.error;
    } else if (response.redirected || response.status === 401) {
      message = 'Your session has expired. Please log in again.';
    } else if (response.status === 403) {
      message = 'Request refused (403). Try reloading the page.';
    } else {
      message = 'Unexpected server response (HTTP ' + response.status + ').';
    }
    const error = new Error(message);
    error.code = payload && payload.error;
    error.status = response.status;
    throw error;
  }

  // ------------------------------------------------------------ connection state

  const stateBadge = $('#conn-state');
  const clientError = $('#client-error');
  const recoveryWarning = $('#recovery-warning');
  let clientErrorTimer = null;

  function showState(state) {
    stateBadge.textContent = state;
    stateBadge.dataset.state = state;
    document.body.dataset.conn = state;
  }

  function showClientError(reply) {
    const where = reply.channel ? ' (' + reply.channel + ')' : '';
    showInline(clientError, (reply.code || 'error') + where + ': ' + (reply.reason || ''));
    clearTimeout(clientErrorTimer);
    clientErrorTimer = setTimeout(() => showInline(clientError, ''), 15000);
  }

  function onSubscribed(channel, reply, info) {
    // stats:* keeps one message only; a gap there is expected and harmless.
    if (reply.recovered === false && info.gap && !channel.startsWith('stats:')) {
      recoveryWarning.hidden = false;
    }
  }

  $('#recovery-dismiss').addEventListener('click', () => { recoveryWarning.hidden = true; });

  const client = new OffloadClient(config.ws_url || undefined, {
    debug: /(?:^|[?&#])debug\b/.test(location.search + location.hash),
    onState: showState,
    onSubscribed,
    onError: showClientError,
  });
  window.demo = {client, config};

  // ------------------------------------------------------------ chat

  const messages = $('#messages');
  const seenMessages = new Set();
  // Saved messages the server rendered (by pk). The subscription resumes from the
  // channel's newest id read before they were (config.room_since), so a message may
  // come both ways: it is shown once.
  const seenPks = new Set();
  for (const li of messages.querySelectorAll('li.message[data-pk]')) {
    seenPks.add(li.dataset.pk);
    const time = li.querySelector('time');
    if (time) localTime(time, time.getAttribute('datetime'));
  }
  messages.scrollTop = messages.scrollHeight;

  function renderMessage(data, msg) {
    const id = msg.id;
    if (id == null || seenMessages.has(String(id))) return;
    seenMessages.add(String(id));
    const body = data && typeof data === 'object' ? data : {text: data};
    if (body.pk != null) {
      if (seenPks.has(String(body.pk))) return;
      seenPks.add(String(body.pk));
    }
    if (body.user != null) typingStopped(String(body.user));

    const li = el('li', 'message');
    li.dataset.id = id;
    if (body.pk != null) li.dataset.pk = body.pk;
    if (body.user != null && body.user === config.username) li.classList.add('mine');
    const meta = el('div', 'meta');
    meta.append(el('span', 'author', body.user != null ? body.user : 'server'), timeEl(body.sent_at));
    li.append(meta, el('span', 'text', body.text != null ? body.text : JSON.stringify(body)));

    const nearBottom = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 80;
    insertById(messages, li, false);
    while (messages.children.length > MAX_MESSAGES) messages.firstElementChild.remove();
    if (nearBottom || li.classList.contains('mine')) messages.scrollTop = messages.scrollHeight;
  }

  // ------------------------------------------------------------ who is here (presence)

  const memberList = $('#members');
  const memberCount = $('#member-count');

  /** The room's members as the client keeps them (every tab of a user is one member). */
  function renderMembers(snapshot) {
    const people = snapshot.members.slice().sort((a, b) =>
      String(a.name || a.id).localeCompare(String(b.name || b.id)));
    const count = snapshot.count != null ? snapshot.count : people.length;
    memberCount.textContent = count + (count === 1 ? ' member' : ' members');
    memberCount.dataset.count = String(count);
    const items = people.map((info) => {
      const li = el('li', 'member');
      li.dataset.id = String(info.id);
      li.append(el('span', 'name', info.name || info.id));
      if (info.name === config.username) {
        li.classList.add('me');
        li.append(el('span', 'tag', 'you'));
      }
      return li;
    });
    memberList.replaceChildren(...items);
    memberList.dataset.synced = String(snapshot.complete);
  }

  client.subscribe(config.room_channel, renderMessage, {since: config.room_since, onMembers: renderMembers});

  const messageForm = $('#message-form');
  const messageInput = $('#message-input');
  const sendError = $('#send-error');
  // Messages leave one after another, in the order typed: each waits for the previous one's answer.
  // The input is free at once, so a message typed meanwhile is neither dropped nor cleared.
  let sent = Promise.resolve();

  messageForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const text = messageInput.value.trim();
    messageInput.focus();
    if (!text) return;
    messageInput.value = '';
    sent = sent.then(() => send(text));
  });

  async function send(text) {
    try {
      // The room's publish hook checks and saves it; refusals come back as errors.
      await client.publish(config.room_channel, {text});
      showInline(sendError, '');
    } catch (err) {
      if (!messageInput.value) messageInput.value = text; // kept, to be fixed and sent again
      showInline(sendError, 'Not sent: ' + (err.reason || err.message) + (err.code ? ' (' + err.code + ')' : ''));
    }
  }
  messageInput.addEventListener('input', () => {
    if (!sendError.hidden) showInline(sendError, '');
    typingNow();
  });

  // ------------------------------------------------------------ typing…

  const typingNotice = $('#typing');
  const typists = new Map(); // username -> timer hiding their notice
  let typingSentAt = -Infinity;

  /** Tells the room (RPC "typing", app/realtime.py) at most once per TYPING_EVERY ms. */
  function typingNow() {
    const now = Date.now();
    if (!messageInput.value.trim() || now - typingSentAt < TYPING_EVERY || !client.connected) return;
    typingSentAt = now;
    client.rpc('typing', {room: config.room}).catch(() => { /* a lost notice is harmless */ });
  }

  function showTypists() {
    const names = Array.from(typists.keys());
    typingNotice.textContent = names.length === 0 ? ''
      : names.join(', ') + (names.length === 1 ? ' is typing…' : ' are typing…');
    typingNotice.hidden = names.length === 0;
  }

  function typingStopped(user) {
    if (!typists.has(user)) return;
    clearTimeout(typists.get(user));
    typists.delete(user);
    showTypists();
  }

  function renderTyping(data) {
    const user = data && typeof data.user === 'string' ? data.user : null;
    if (user == null || user === config.username) return;
    clearTimeout(typists.get(user));
    typists.set(user, setTimeout(() => typingStopped(user), TYPING_SHOWN));
    showTypists();
  }

  // Live only (no since): an old notice means nothing.
  client.subscribe(config.typing_channel, renderTyping);

  // ------------------------------------------------------------ notifications

  const notifications = $('#notifications');
  const notifyButton = $('#notify-button');
  const notifyError = $('#notify-error');
  const seenNotifications = new Set();

  function renderNotification(data, msg) {
    if (data && data.kind === 'task') {
      renderTask(data);
      return;
    }
    const id = msg.id;
    if (id == null || seenNotifications.has(String(id))) return;
    seenNotifications.add(String(id));
    const body = data && typeof data === 'object' ? data : {text: data};

    const li = el('li', 'notification');
    li.dataset.id = id;
    li.append(el('span', 'text', body.text != null ? body.text : JSON.stringify(body)), timeEl(body.sent_at));
    insertById(notifications, li, true);
    while (notifications.children.length > MAX_NOTIFICATIONS) notifications.lastElementChild.remove();
  }

  client.subscribe(config.user_channel, renderNotification, {since: OffloadClient.ZERO_ID});

  notifyButton.addEventListener('click', async () => {
    notifyButton.disabled = true;
    try {
      await post(config.notify_url);
      showInline(notifyError, '');
    } catch (err) {
      showInline(notifyError, 'Failed: ' + err.message);
    } finally {
      notifyButton.disabled = false;
    }
  });

  // ------------------------------------------------------------ reports (spooler tasks)

  const reportButton = $('#report-button');
  const reportProgress = $('#report-progress');
  const reportStatus = $('#report-status');
  const reportLink = $('#report-link');
  const reportError = $('#report-error');
  let currentTask = null;

  /** Task messages arrive on the user's channel: queued, running, done or failed. */
  function renderTask(data) {
    if (currentTask !== null && data.task_id !== currentTask) return;
    currentTask = data.task_id;
    reportProgress.hidden = false;
    reportProgress.dataset.state = data.state;
    if (data.state === 'running' && typeof data.progress === 'number') {
      reportProgress.value = data.progress;
      reportStatus.textContent = `Building… ${Math.round(data.progress * 100)}%` + (data.text ? ` (${data.text})` : '');
    } else if (data.state === 'queued') {
      reportProgress.value = 0;
      reportStatus.textContent = 'Queued in the spooler…';
    } else if (data.state === 'retrying') {
      reportStatus.textContent = 'Failed, retrying: ' + data.error;
    } else if (data.state === 'done') {
      reportProgress.value = 1;
      const mb = data.result && data.result.bytes ? (data.result.bytes / 1e6).toFixed(1) + ' MB' : '';
      reportStatus.textContent = `Done in ${data.seconds}s. ` + mb;
      reportLink.href = data.result.download;
      reportLink.hidden = false;
      reportButton.disabled = false;
    } else if (data.state === 'failed') {
      showInline(reportError, 'Report failed: ' + data.error);
      reportStatus.textContent = '';
      reportButton.disabled = false;
    }
  }

  reportButton.addEventListener('click', async () => {
    reportButton.disabled = true;
    reportLink.hidden = true;
    showInline(reportError, '');
    try {
      const reply = await post(config.report_url, {seconds: reportButton.dataset.seconds || '10'});
      currentTask = reply.task_id;
      reportProgress.hidden = false;
      reportProgress.value = 0;
      reportStatus.textContent = 'Queued in the spooler…';
    } catch (err) {
      showInline(reportError, 'Not started: ' + err.message);
      reportButton.disabled = false;
    }
  });

  // ------------------------------------------------------------ server stats

  const statsBody = $('#stats');
  const statsEmpty = $('#stats-empty');
  const STATS_FIELDS = ['worker', 'pid', 'connections', 'channels', 'delivered', 'redis'];
  const workers = new Map(); // pid -> {tr, cells, seen}

  function renderStats(data) {
    if (!data || typeof data !== 'object' || data.pid == null) return;
    const pid = String(data.pid);
    let row = workers.get(pid);
    if (!row) {
      const tr = el('tr');
      tr.dataset.pid = pid;
      const cells = {};
      for (const field of STATS_FIELDS) {
        cells[field] = el('td', 'stat-' + field);
        tr.append(cells[field]);
      }
      tr.dataset.worker = data.worker;
      row = {tr, cells};
      workers.set(pid, row);
      // keep rows sorted by worker number, then pid
      const worker = Number(data.worker);
      let before = null;
      for (const other of statsBody.children) {
        const w = Number(other.dataset.worker);
        if (w > worker || (w === worker && Number(other.dataset.pid) > Number(pid))) {
          before = other;
          break;
        }
      }
      statsBody.insertBefore(tr, before);
    }
    row.seen = Date.now();
    row.tr.dataset.worker = data.worker;
    for (const field of STATS_FIELDS) {
      const value = data[field];
      row.cells[field].textContent = value == null ? '–' : String(value);
    }
    const redisUp = data.redis === 'up';
    row.cells.redis.className = 'stat-redis ' + (redisUp ? 'redis-up' : 'redis-down');
    row.tr.title = data.ts ? 'updated ' + new Date(data.ts * 1000).toLocaleTimeString() : '';
    statsEmpty.hidden = true;
  }

  function pruneStats() {
    const now = Date.now();
    for (const [pid, row] of workers) {
      if (now - row.seen > STATS_TTL) {
        row.tr.remove();
        workers.delete(pid);
      }
    }
    statsEmpty.hidden = workers.size > 0;
  }

  client.subscribe('stats:workers', renderStats);
  setInterval(pruneStats, 1000);

  // ------------------------------------------------------------ echo

  const echoForm = $('#echo-form');
  const echoInput = $('#echo-input');
  const echoLog = $('#echo-log');
  const echoStatus = $('#echo-status');
  let echoSocket = null;
  let echoQueue = [];

  function echoUrl() {
    return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws/echo';
  }

  /** Opens the echo websocket (lazily, on first use or after it closed). */
  function openEcho() {
    const ws = new WebSocket(echoUrl());
    echoSocket = ws;
    echoStatus.textContent = 'connecting…';
    ws.onopen = () => {
      echoStatus.textContent = 'connected';
      for (const text of echoQueue.splice(0)) ws.send(text);
    };
    ws.onmessage = (event) => {
      const text = typeof event.data === 'string'
        ? event.data
        : '[binary ' + (event.data.size != null ? event.data.size : event.data.byteLength) + ' bytes]';
      echoLog.append(el('li', 'echo', text));
      while (echoLog.children.length > MAX_ECHOES) echoLog.firstElementChild.remove();
      echoLog.scrollTop = echoLog.scrollHeight;
    };
    ws.onclose = (event) => {
      if (echoSocket !== ws) return;
      echoSocket = null;
      const unsent = echoQueue.length;
      echoQueue = [];
      echoStatus.textContent = unsent
        ? 'could not connect (' + event.code + '), try again'
        : 'closed (' + event.code + ')';
    };
  }

  echoForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const text = echoInput.value;
    if (!text) return;
    if (!echoSocket || echoSocket.readyState > WebSocket.OPEN) openEcho();
    if (echoSocket.readyState === WebSocket.OPEN) echoSocket.send(text);
    else echoQueue.push(text);
    echoInput.value = '';
    echoInput.focus();
  });
})();

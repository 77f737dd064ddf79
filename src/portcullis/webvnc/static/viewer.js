// The portal's VNC viewer (docs/webvnc.md). It fetches a single-use ticket for this
// desktop (a JSON POST), opens the gateway's WebSocket, sends the
// ticket as the first message and then hands the open socket to noVNC, which speaks RFB
// over it. The page never learns where the desktop's server is. Why a connection ended
// comes from the WebSocket's close code (see webvnc/relay.py) or noVNC's security failure.
import RFB from "./novnc/core/rfb.js";

const root = document.getElementById("vnc");
const screen = document.getElementById("vnc-screen");
const statusLine = document.getElementById("vnc-status");
const problem = document.getElementById("vnc-problem");
const clipboard = document.getElementById("vnc-clipboard-text");
// What acts on the desktop: usable only while it is connected.
const desktopControls = ["vnc-fullscreen", "vnc-ctrl-alt-del", "vnc-clipboard-send"]
  .map((id) => document.getElementById(id));
let rfb = null;

function controls(enabled) {
  for (const control of desktopControls) {
    control.disabled = !enabled;
  }
}

function say(text) {
  statusLine.textContent = text;
}

function stop(title, text) {
  root.dataset.state = "ended";
  controls(false);
  problem.querySelector("h2").textContent = title;
  problem.querySelector("p.error").textContent = text;
  problem.hidden = false;
  say(title);
}

// What the user reads when the connection is over, most specific first.
function explain(closed, refusal, connected) {
  if (refusal !== null) {
    stop("The desktop refused the connection", refusal);
  } else if (closed && closed.code === 4001) {
    // The gateway's own words: "your session ended: signed out ...; sign in again ...".
    const told = closed.reason || "your session ended";
    stop("Disconnected", told.charAt(0).toUpperCase() + told.slice(1) + ".");
  } else if (closed && closed.code === 1008) {
    stop("The gateway refused the connection",
         "The link to this desktop was already used or has expired. Reconnect to get a new one.");
  } else if (closed && closed.code === 1011) {
    stop("The gateway could not connect you", "Try again in a moment.");
  } else if (connected) {
    stop("The desktop ended the session", "Reconnect to open it again.");
  } else {
    stop("Cannot connect to the desktop",
         "The gateway could not be reached. Check your connection, then reconnect.");
  }
}

async function ticket() {
  const answer = await fetch(root.dataset.ticketUrl, {
    // JSON: the portal's rule for state-changing calls (no cross-site form sends it).
    method: "POST", credentials: "same-origin", cache: "no-store",
    headers: { "Content-Type": "application/json" }, body: "{}",
  });
  if (answer.status === 401) {
    window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
    return null;
  }
  if (!answer.ok) {
    stop("Not allowed", "The gateway will not open this desktop for you now. " +
         "Go back to your resources and try again.");
    return null;
  }
  return answer.json();
}

async function connect() {
  problem.hidden = true;
  controls(false);
  root.dataset.state = "connecting";
  say("Connecting…");
  let issued;
  try {
    issued = await ticket();
  } catch (error) {
    explain(null, null, false);
    return;
  }
  if (issued === null) {
    return;
  }
  const url = new URL(issued.websocket, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(url);
  socket.binaryType = "arraybuffer";
  let closed = null;
  let refusal = null;
  let connected = false;
  // Registered before noVNC's own handler, so the code is known when noVNC reports.
  socket.addEventListener("close", (event) => {
    closed = event;
    if (rfb === null) {
      explain(closed, refusal, connected);   // it never got as far as noVNC
    }
  });
  socket.addEventListener("open", () => {
    socket.send(new TextEncoder().encode(issued.ticket));
    rfb = new RFB(screen, socket, { shared: true });
    rfb.scaleViewport = true;
    rfb.addEventListener("connect", () => {
      connected = true;
      controls(true);
      root.dataset.state = "connected";
      say("Connected to " + root.dataset.title + ".");
      rfb.focus();
    });
    rfb.addEventListener("securityfailure", (event) => {
      refusal = event.detail.reason || "The desktop gave no reason.";
    });
    rfb.addEventListener("disconnect", () => {
      rfb = null;
      explain(closed, refusal, connected);
    });
    rfb.addEventListener("clipboard", (event) => {
      clipboard.value = event.detail.text;
      // Also onto the local clipboard where the browser allows it (a secure page with
      // the user's permission); the text area works everywhere.
      if (navigator.clipboard) {
        navigator.clipboard.writeText(event.detail.text).catch(() => {});
      }
    });
  }, { once: true });
}

document.getElementById("vnc-reconnect").addEventListener("click", () => connect());
document.getElementById("vnc-fullscreen").addEventListener("click", () => {
  screen.requestFullscreen().catch(() => say("This browser did not allow full screen."));
});
document.getElementById("vnc-ctrl-alt-del").addEventListener("click", () => {
  if (rfb !== null) {
    rfb.sendCtrlAltDel();
    rfb.focus();
  }
});
document.getElementById("vnc-clipboard-send").addEventListener("click", () => {
  if (rfb !== null) {
    rfb.clipboardPasteFrom(clipboard.value);
    rfb.focus();
  }
});
connect();

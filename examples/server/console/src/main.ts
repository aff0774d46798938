// The console's router: one page per URL hash, so the server serves one index.html.
//   #/sign-in  #/capsules  #/capsules/NAME  #/capsules/NAME/terminal  #/team
import "./style.css";
import { signOut, token, whenSignedOut } from "./api";
import { $, replace } from "./dom";
import { capsulesPage } from "./pages/capsules";
import { capsulePage } from "./pages/capsule";
import { signInPage } from "./pages/signin";
import { teamPage } from "./pages/team";

/** What a page returns: an optional clean-up run when the page is left. */
export type Leave = (() => void) | void;

let leave: Leave;

async function route(): Promise<void> {
  if (typeof leave === "function") leave();
  leave = undefined;
  const app = $("#app")!;
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  const signedIn = token() !== null;
  $("#nav")!.hidden = !signedIn;
  if (!signedIn && parts[0] !== "sign-in") {
    location.replace("#/sign-in");
    return;
  }
  for (const a of document.querySelectorAll<HTMLElement>("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === parts[0]);
  }
  replace(app);
  const view = document.createElement("div");
  view.className = "view";
  app.appendChild(view);
  switch (parts[0]) {
    case "sign-in":
      if (signedIn) return location.replace("#/capsules");
      document.title = "Sign in · Capsules";
      leave = signInPage(view);
      break;
    case "team":
      document.title = "Team · Capsules";
      leave = await teamPage(view);
      break;
    case "capsules":
      if (parts[1] && parts[2] === "terminal") {
        document.title = `${parts[1]} terminal · Capsules`;
        const { terminalPage } = await import("./pages/terminal");
        leave = await terminalPage(view, parts[1]);
      } else if (parts[1]) {
        document.title = `${parts[1]} · Capsules`;
        leave = await capsulePage(view, parts[1]);
      } else {
        document.title = "Capsules";
        leave = await capsulesPage(view);
      }
      break;
    default:
      location.replace("#/capsules");
  }
}

whenSignedOut(() => {
  // A new hash routes through hashchange; on the same hash, route directly to show the message.
  if (location.hash !== "#/sign-in") location.hash = "#/sign-in";
  else void route();
});

window.addEventListener("hashchange", () => void route());
$("#sign-out")!.addEventListener("click", () => signOut(null));
void route();

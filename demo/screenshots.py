"""Screenshots of the three tabs of a running demo, in headless Chromium (README's docs/demo_*.png).

    python -m demo &                       # the demo world, on http://127.0.0.1:7860
    python -m demo.screenshots --out docs --image data/demo/images/test_00003.png \\
        --caption 'a red circle on the left' --search 'a large blue square' --question 'what color is the circle?'

Needs Playwright (`pip install playwright`) and a Chromium (Debian: `apt-get install chromium`); no
browser download is needed. Each PNG is scaled to --width pixels and stored with a 256-colour palette.
"""
import argparse
import os
import shutil
import sys


def capture(url, out, image, caption, search, question, width=1000, executable=None):
    from PIL import Image
    from playwright.sync_api import sync_playwright
    executable = executable or next(filter(None, map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome'))),
                                    None)
    if executable is None:
        raise SystemExit('no Chromium found: install one (apt-get install chromium) or pass --chromium PATH')
    os.makedirs(out, exist_ok=True)
    paths = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=['--no-sandbox'])
        page = browser.new_page(viewport={'width': 1280, 'height': 900})
        page.goto(url, wait_until='networkidle')

        page.locator('#look-image input[type=file]').set_input_files(image)
        page.locator('#look-caption textarea').fill(caption)
        page.locator('#look-run').click()
        page.locator('#look-panels img').nth(1).wait_for(timeout=120_000)
        paths.append(_shot(page, out, 'look', width))

        page.get_by_role('tab', name='Search').click()
        page.locator('#search-text textarea').fill(search)
        page.get_by_label('re-rank by ITM').check()
        page.locator('#search-run').click()
        page.locator('#search-gallery img').first.wait_for(timeout=300_000)
        paths.append(_shot(page, out, 'search', width))

        page.get_by_role('tab', name='Ask').click()
        page.locator('#ask-image input[type=file]').set_input_files(image)
        page.locator('#ask-question textarea').fill(question)
        page.locator('#ask-run').click()
        page.wait_for_function("document.querySelector('#ask-answers').innerText.includes('%')", timeout=120_000)
        paths.append(_shot(page, out, 'ask', width))
        browser.close()
    for path in paths:
        with Image.open(path) as shot:
            shot = shot.convert('RGB')
        shot = shot.resize((width, round(shot.height * width / shot.width)), Image.LANCZOS)
        shot.quantize(256).save(path, optimize=True)
        print(f'{path}: {shot.width}x{shot.height}, {os.path.getsize(path) // 1024} KB')
    return paths


def _shot(page, out, name, width):
    page.wait_for_load_state('networkidle')
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
                           timeout=60_000)
    page.wait_for_timeout(800)  # let the results settle (fade-ins, progress bars)
    path = os.path.join(out, f'demo_{name}.png')
    page.screenshot(path=path, full_page=True)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m demo.screenshots', description=__doc__.split('\n\n')[0])
    parser.add_argument('--url', default='http://127.0.0.1:7860/')
    parser.add_argument('--out', default='docs')
    parser.add_argument('--image', required=True, help='the image for Look and Ask')
    parser.add_argument('--caption', required=True)
    parser.add_argument('--search', required=True, help='the text for Search')
    parser.add_argument('--question', required=True)
    parser.add_argument('--width', type=int, default=1000)
    parser.add_argument('--chromium', default=None, help='the browser executable (default: chromium on the PATH)')
    args = parser.parse_args(argv)
    capture(args.url, args.out, args.image, args.caption, args.search, args.question, args.width, args.chromium)
    return 0


if __name__ == '__main__':
    sys.exit(main())

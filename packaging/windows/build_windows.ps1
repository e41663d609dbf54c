# Build the Windows installer: PyInstaller one-folder app, then an Inno Setup installer.
#
#   powershell -ExecutionPolicy Bypass -File packaging\windows\build_windows.ps1
#
# Run from any folder on Windows 10/11 x64 with Python 3.10-3.12 and Inno Setup 6 installed
# (https://jrsoftware.org/isinfo.php; iscc.exe on PATH or in its default folder). Creates the venv
# .venv-win in the repository (CPU torch, the app's dependencies, PyInstaller) on first use.
# Outputs: packaging\dist\pyinstaller\tandem\ (the app folder) and
#          packaging\dist\tandem-<version>-windows-x64-setup.exe
# Not run by this project's CI (Linux only): see packaging\README.md.
param(
    [string]$Python = "py -3",
    [switch]$SkipInstaller
)
$ErrorActionPreference = "Stop"
$Root = (Resolve-Path "$PSScriptRoot\..\..").Path
Set-Location $Root

$Venv = Join-Path $Root ".venv-win"
$Py = Join-Path $Venv "Scripts\python.exe"
if (-not (Test-Path $Py)) {
    Write-Host "[tandem build] creating $Venv"
    Invoke-Expression "$Python -m venv `"$Venv`""
    # The CPU wheel of torch (the default index would bring a CUDA build of several GB).
    & $Py -m pip install --upgrade pip
    & $Py -m pip install torch --index-url https://download.pytorch.org/whl/cpu
    & $Py -m pip install -e ".[packaging]"
    if ($LASTEXITCODE -ne 0) { throw "pip install failed" }
}

$Version = (Select-String -Path pyproject.toml -Pattern '^version = "([^"]+)"').Matches[0].Groups[1].Value
$Icons = Join-Path $Root "packaging\build\icons"
& $Py packaging\make_icons.py $Icons
if ($LASTEXITCODE -ne 0) { throw "make_icons.py failed" }

Write-Host "[tandem build] PyInstaller"
$env:TANDEM_ICON_DIR = $Icons
& $Py -m PyInstaller --noconfirm --log-level WARN `
    --distpath packaging\dist\pyinstaller --workpath packaging\build\pyinstaller packaging\tandem.spec
if ($LASTEXITCODE -ne 0) { throw "PyInstaller failed" }

Write-Host "[tandem build] checking the frozen app (--bundle-check)"
& packaging\dist\pyinstaller\tandem\tandem-cli.exe --bundle-check
if ($LASTEXITCODE -ne 0) { throw "--bundle-check of the frozen app failed" }

if ($SkipInstaller) { exit 0 }
$Iscc = (Get-Command iscc.exe -ErrorAction SilentlyContinue).Source
if (-not $Iscc) {
    foreach ($dir in @("${env:ProgramFiles(x86)}\Inno Setup 6", "$env:ProgramFiles\Inno Setup 6", "$env:LOCALAPPDATA\Programs\Inno Setup 6")) {
        if (Test-Path "$dir\ISCC.exe") { $Iscc = "$dir\ISCC.exe"; break }
    }
}
if (-not $Iscc) { throw "Inno Setup 6 (ISCC.exe) not found: install it or add it to PATH" }
& $Iscc "/DAppVersion=$Version" "/DSourceDir=$Root\packaging\dist\pyinstaller\tandem" `
    "/DIconFile=$Icons\tandem.ico" "/DOutputDir=$Root\packaging\dist" packaging\windows\tandem.iss
if ($LASTEXITCODE -ne 0) { throw "iscc failed" }
Get-ChildItem packaging\dist\tandem-*-setup.exe | ForEach-Object { "{0}  {1:N0} MiB" -f $_.Name, ($_.Length / 1MB) }
